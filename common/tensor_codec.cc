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

namespace {

uint16_t ToBF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>(u >> 16);
}

float FromBF16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Reads element i of a BF16 payload (the bytes may be unaligned).
uint16_t BF16At(const std::string& bytes, int64_t i) {
  uint16_t h;
  std::memcpy(&h, bytes.data() + 2 * i, 2);
  return h;
}

}  // namespace

void EncodeBF16(absl::Span<const float> values, std::string* out) {
  out->resize(values.size() * 2);
  char* p = out->data();
  for (size_t i = 0; i < values.size(); ++i) {
    const uint16_t h = ToBF16(values[i]);
    std::memcpy(p + 2 * i, &h, 2);
  }
}

void Encode(tessera::v1::DType dtype, absl::Span<const float> values, std::string* out) {
  if (dtype == tessera::v1::BF16) {
    EncodeBF16(values, out);
  } else {
    EncodeF32(values, out);
  }
}

absl::Status DecodeF32(tessera::v1::DType dtype, const std::string& bytes,
                       absl::Span<float> out) {
  if (dtype != tessera::v1::F32 && dtype != tessera::v1::BF16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unsupported dtype ", tessera::v1::DType_Name(dtype), ", expected F32 or BF16"));
  }
  const size_t width = DTypeSize(dtype);
  if (bytes.size() != out.size() * width) {
    return absl::InvalidArgumentError(
        absl::StrCat("payload has ", bytes.size(), " bytes, expected ", out.size() * width, " (",
                     out.size(), " ", tessera::v1::DType_Name(dtype), " elements)"));
  }
  if (dtype == tessera::v1::F32) {
    if (!out.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
  } else {
    for (size_t i = 0; i < out.size(); ++i) out[i] = FromBF16(BF16At(bytes, i));
  }
  return absl::OkStatus();
}

void AccumulateInto(tessera::v1::DType dtype, const std::string& bytes, float* acc, int64_t n) {
  if (dtype == tessera::v1::BF16) {
    for (int64_t i = 0; i < n; ++i) acc[i] += FromBF16(BF16At(bytes, i));
    return;
  }
  const char* p = bytes.data();
  for (int64_t i = 0; i < n; ++i) {
    float v;
    std::memcpy(&v, p + 4 * i, 4);
    acc[i] += v;
  }
}

bool PayloadFinite(tessera::v1::DType dtype, const std::string& bytes, int64_t n) {
  return PayloadFinite(dtype, bytes.data(), n);
}

bool PayloadFinite(tessera::v1::DType dtype, const char* data, int64_t n) {
  // A value is NaN or infinite exactly when its exponent bits are all ones.
  // OR-ing a per-element flag over integer loads vectorises; a float
  // reduction would not, without -ffast-math.
  if (dtype == tessera::v1::BF16) {
    uint16_t any = 0;
    for (int64_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, data + 2 * i, 2);
      any |= static_cast<uint16_t>((h & 0x7f80) == 0x7f80);
    }
    return any == 0;
  }
  uint32_t any = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, data + 4 * i, 4);
    any |= static_cast<uint32_t>((u & 0x7f800000u) == 0x7f800000u);
  }
  return any == 0;
}

bool PayloadWithinGradientLimit(tessera::v1::DType dtype, const std::string& bytes, int64_t n) {
  // Biased exponent 127 + 101: the smallest magnitude refused is 2^101.
  const char* data = bytes.data();
  if (dtype == tessera::v1::BF16) {
    uint16_t any = 0;
    for (int64_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, data + 2 * i, 2);
      any |= static_cast<uint16_t>((h & 0x7f80) >= (228u << 7));
    }
    return any == 0;
  }
  uint32_t any = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, data + 4 * i, 4);
    any |= static_cast<uint32_t>((u & 0x7f800000u) >= (228u << 23));
  }
  return any == 0;
}

bool AllFinite(absl::Span<const float> values) {
  return PayloadFinite(tessera::v1::F32,
                       reinterpret_cast<const char*>(values.data()), values.size());
}

}  // namespace tessera
