// Encoding of tensor payloads: raw little-endian bytes with a dtype.

#ifndef TESSERA_COMMON_TENSOR_CODEC_H_
#define TESSERA_COMMON_TENSOR_CODEC_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "proto/tessera.pb.h"

namespace tessera {

// Size in bytes of one element of `dtype`; 0 for DTYPE_UNSPECIFIED.
int DTypeSize(tessera::v1::DType dtype);

// Whether payloads can travel in `dtype`: F32, BF16 or F16.
bool IsWireDType(tessera::v1::DType dtype);

// Writes `values` into `out` as F32 little-endian bytes, reusing its capacity.
void EncodeF32(absl::Span<const float> values, std::string* out);

// Writes `values` as bfloat16 (round to nearest even; NaN stays NaN),
// little-endian, into `out`: half the bytes of F32, 8 bits of mantissa.
void EncodeBF16(absl::Span<const float> values, std::string* out);

// Writes `values` as IEEE binary16 (round to nearest even; magnitudes of
// 65520 and more become infinity, NaN stays NaN; 11 bits of precision
// down to 2^-14, subnormals below), little-endian, into `out`.
void EncodeF16(absl::Span<const float> values, std::string* out);

// Writes `values` in `dtype` (F32, BF16 or F16) into `out`.
void Encode(tessera::v1::DType dtype, absl::Span<const float> values, std::string* out);

// The same into memory the caller owns, which must hold exactly
// values.size() * DTypeSize(dtype) bytes.
void EncodeTo(tessera::v1::DType dtype, absl::Span<const float> values, absl::Span<char> out);

// Decodes a payload of `dtype` (F32, BF16 or F16) holding exactly out.size()
// elements into `out`. kInvalidArgument when the dtype is unsupported or
// the byte length does not match; `out` is untouched then.
absl::Status DecodeF32(tessera::v1::DType dtype, absl::string_view bytes,
                       absl::Span<float> out);

// Adds the `n` elements of an F32, BF16 or F16 payload to `acc`.
void AccumulateInto(tessera::v1::DType dtype, absl::string_view bytes, float* acc, int64_t n);

// True when every element of an F32, BF16 or F16 payload of `n` elements is
// finite.
bool PayloadFinite(tessera::v1::DType dtype, absl::string_view bytes, int64_t n);
bool PayloadFinite(tessera::v1::DType dtype, const char* data, int64_t n);

// True when every element is finite and below 2^101 in magnitude: the
// bound the servers put on gradients, so that sums over any number of
// workers and learning-rate-scaled updates cannot overflow F32.
bool PayloadWithinGradientLimit(tessera::v1::DType dtype, absl::string_view bytes, int64_t n);

// Returns true when every value is finite (no NaN, no +-Inf).
bool AllFinite(absl::Span<const float> values);

// Sparse blocks (TensorBlock.sparse): `indices` holds little-endian uint32
// positions within the block, strictly increasing; `data` one value per
// index; every other element is zero.

// Top-k sparsification with error feedback. Adds `grad` to `residual`
// (the error carried over from earlier steps), picks the k elements of the
// sum with the largest magnitude (k clamped to [1, size]), writes them to
// `indices` and `data` (in `dtype`, F32, BF16 or F16) and leaves in `residual`
// what was not sent: the unsent elements whole, and for the sent ones their
// rounding error in `dtype`. `scratch` is reused working space. Buffers
// keep their capacity from call to call.
void EncodeTopK(tessera::v1::DType dtype, absl::Span<const float> grad, int64_t k,
                absl::Span<float> residual, std::vector<uint32_t>* scratch,
                std::string* indices, std::string* data);

// Checks a sparse payload against a block of `n` elements: whole uint32
// indices, strictly increasing, below n; one `dtype` value per index.
// kInvalidArgument naming the problem otherwise.
absl::Status ValidateSparse(tessera::v1::DType dtype, absl::string_view indices,
                            absl::string_view data, int64_t n);

// Adds a validated sparse payload into `acc` (acc[index] += value).
void ScatterAddInto(tessera::v1::DType dtype, absl::string_view indices,
                    absl::string_view data, float* acc);

}  // namespace tessera

#endif  // TESSERA_COMMON_TENSOR_CODEC_H_
