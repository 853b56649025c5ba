#include "common/tensor_codec.h"

#include <bit>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace tessera {

// The wire format is little-endian; on a little-endian host it is also the
// in-memory format, so payloads are copied with memcpy and never converted.
static_assert(std::endian::native == std::endian::little,
              "Tessera's wire format assumes a little-endian host");

int DTypeSize(tessera::v1::DType dtype) {
  switch (dtype) {
    case tessera::v1::F32:
      return 4;
    case tessera::v1::BF16:
    case tessera::v1::F16:
      return 2;
    default:
      return 0;
  }
}

void EncodeF32(absl::Span<const float> values, std::string* out) {
  out->resize(values.size() * sizeof(float));
  if (!values.empty()) {
    std::memcpy(out->data(), values.data(), values.size() * sizeof(float));
  }
}

absl::Status DecodeF32(tessera::v1::DType dtype, const std::string& bytes,
                       absl::Span<float> out) {
  if (dtype != tessera::v1::F32) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unsupported dtype ", tessera::v1::DType_Name(dtype), ", expected F32"));
  }
  if (bytes.size() != out.size() * sizeof(float)) {
    return absl::InvalidArgumentError(
        absl::StrCat("payload has ", bytes.size(), " bytes, expected ",
                     out.size() * sizeof(float), " (", out.size(),
                     " F32 elements)"));
  }
  if (!out.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
  return absl::OkStatus();
}

bool AllFinite(absl::Span<const float> values) {
  // Summing x - x is 0 for finite x and NaN otherwise; a branch-free
  // reduction vectorises where an early-exit loop would not.
  float acc = 0.0f;
  for (float v : values) acc += v - v;
  return acc == 0.0f;
}

}  // namespace tessera
