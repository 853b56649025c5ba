// Encoding of tensor payloads: raw little-endian bytes with a dtype.

#ifndef TESSERA_COMMON_TENSOR_CODEC_H_
#define TESSERA_COMMON_TENSOR_CODEC_H_

#include <string>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "proto/tessera.pb.h"

namespace tessera {

// Size in bytes of one element of `dtype`; 0 for DTYPE_UNSPECIFIED.
int DTypeSize(tessera::v1::DType dtype);

// Writes `values` into `out` as F32 little-endian bytes, reusing its capacity.
void EncodeF32(absl::Span<const float> values, std::string* out);

// Decodes a payload of `dtype` holding exactly out.size() elements into `out`.
// kInvalidArgument when the dtype is unsupported or the byte length does not
// match; `out` is untouched then.
absl::Status DecodeF32(tessera::v1::DType dtype, const std::string& bytes,
                       absl::Span<float> out);

// Returns true when every value is finite (no NaN, no +-Inf).
bool AllFinite(absl::Span<const float> values);

}  // namespace tessera

#endif  // TESSERA_COMMON_TENSOR_CODEC_H_
