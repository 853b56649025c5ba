#include "common/tensor_codec.h"

#include <algorithm>
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

// IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits. Rounds to
// nearest, ties to even; magnitudes from 65520 up become infinity, NaN
// stays NaN, and small values become subnormals or zero.
uint16_t ToF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: infinity
  if (a >= 0x38800000u) {  // normal in binary16 (>= 2^-14)
    const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
    return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
  }
  if (a < 0x33000000u) return sign;  // below half the smallest subnormal (2^-25): zero
  // Subnormal: the value in units of 2^-24, rounded to nearest even.
  const uint32_t exponent = a >> 23;             // 102..112
  const uint32_t mantissa = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126 - exponent;         // 14..24
  const uint32_t half = 1u << (shift - 1);
  const uint32_t rest = mantissa & ((1u << shift) - 1);
  uint32_t h = mantissa >> shift;
  if (rest > half || (rest == half && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

float FromF16(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t u;
  if (exponent == 0x1f) {
    u = sign | 0x7f800000u | (mantissa << 13);  // infinity or NaN
  } else if (exponent != 0) {
    u = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    u = sign;
  } else {  // subnormal: normalise
    int e = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --e;
    }
    u = sign | (static_cast<uint32_t>(e) << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Reads element i of a 16-bit payload (the bytes may be unaligned).
uint16_t HalfAt(absl::string_view bytes, int64_t i) {
  uint16_t h;
  std::memcpy(&h, bytes.data() + 2 * i, 2);
  return h;
}

// A 16-bit element (BF16 or F16) as a float.
float WidenHalf(tessera::v1::DType dtype, uint16_t h) {
  return dtype == tessera::v1::BF16 ? FromBF16(h) : FromF16(h);
}

uint16_t NarrowToHalf(tessera::v1::DType dtype, float f) {
  return dtype == tessera::v1::BF16 ? ToBF16(f) : ToF16(f);
}

bool IsHalf(tessera::v1::DType dtype) {
  return dtype == tessera::v1::BF16 || dtype == tessera::v1::F16;
}

void EncodeHalfInto(tessera::v1::DType dtype, absl::Span<const float> values, char* p) {
  if (dtype == tessera::v1::BF16) {
    for (size_t i = 0; i < values.size(); ++i) {
      const uint16_t h = ToBF16(values[i]);
      std::memcpy(p + 2 * i, &h, 2);
    }
  } else {
    for (size_t i = 0; i < values.size(); ++i) {
      const uint16_t h = ToF16(values[i]);
      std::memcpy(p + 2 * i, &h, 2);
    }
  }
}

}  // namespace

namespace {

void EncodeHalf(tessera::v1::DType dtype, absl::Span<const float> values, std::string* out) {
  out->resize(values.size() * 2);
  EncodeHalfInto(dtype, values, out->data());
}

}  // namespace

void EncodeBF16(absl::Span<const float> values, std::string* out) {
  EncodeHalf(tessera::v1::BF16, values, out);
}

void EncodeF16(absl::Span<const float> values, std::string* out) {
  EncodeHalf(tessera::v1::F16, values, out);
}

void EncodeTo(tessera::v1::DType dtype, absl::Span<const float> values, absl::Span<char> out) {
  if (IsHalf(dtype)) {
    EncodeHalfInto(dtype, values, out.data());
  } else if (!values.empty()) {
    std::memcpy(out.data(), values.data(), values.size() * sizeof(float));
  }
}

void Encode(tessera::v1::DType dtype, absl::Span<const float> values, std::string* out) {
  if (IsHalf(dtype)) {
    EncodeHalf(dtype, values, out);
  } else {
    EncodeF32(values, out);
  }
}

bool IsWireDType(tessera::v1::DType dtype) { return dtype == tessera::v1::F32 || IsHalf(dtype); }

absl::Status DecodeF32(tessera::v1::DType dtype, absl::string_view bytes,
                       absl::Span<float> out) {
  if (!IsWireDType(dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unsupported dtype ", tessera::v1::DType_Name(dtype), ", expected F32, BF16 or F16"));
  }
  const size_t width = DTypeSize(dtype);
  if (bytes.size() != out.size() * width) {
    return absl::InvalidArgumentError(
        absl::StrCat("payload has ", bytes.size(), " bytes, expected ", out.size() * width, " (",
                     out.size(), " ", tessera::v1::DType_Name(dtype), " elements)"));
  }
  if (dtype == tessera::v1::F32) {
    if (!out.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
  } else if (dtype == tessera::v1::BF16) {
    for (size_t i = 0; i < out.size(); ++i) out[i] = FromBF16(HalfAt(bytes, i));
  } else {
    for (size_t i = 0; i < out.size(); ++i) out[i] = FromF16(HalfAt(bytes, i));
  }
  return absl::OkStatus();
}

void AccumulateInto(tessera::v1::DType dtype, absl::string_view bytes, float* acc, int64_t n) {
  if (dtype == tessera::v1::BF16) {
    for (int64_t i = 0; i < n; ++i) acc[i] += FromBF16(HalfAt(bytes, i));
    return;
  }
  if (dtype == tessera::v1::F16) {
    for (int64_t i = 0; i < n; ++i) acc[i] += FromF16(HalfAt(bytes, i));
    return;
  }
  const char* p = bytes.data();
  for (int64_t i = 0; i < n; ++i) {
    float v;
    std::memcpy(&v, p + 4 * i, 4);
    acc[i] += v;
  }
}

bool PayloadFinite(tessera::v1::DType dtype, absl::string_view bytes, int64_t n) {
  return PayloadFinite(dtype, bytes.data(), n);
}

bool PayloadFinite(tessera::v1::DType dtype, const char* data, int64_t n) {
  // A value is NaN or infinite exactly when its exponent bits are all ones.
  // OR-ing a per-element flag over integer loads vectorises; a float
  // reduction would not, without -ffast-math.
  if (IsHalf(dtype)) {
    const uint16_t exponent = dtype == tessera::v1::BF16 ? 0x7f80 : 0x7c00;
    uint16_t any = 0;
    for (int64_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, data + 2 * i, 2);
      any |= static_cast<uint16_t>((h & exponent) == exponent);
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

bool PayloadWithinGradientLimit(tessera::v1::DType dtype, absl::string_view bytes, int64_t n) {
  // Biased exponent 127 + 101: the smallest magnitude refused is 2^101.
  const char* data = bytes.data();
  // Every finite F16 value (at most 65504) is far below the limit.
  if (dtype == tessera::v1::F16) return PayloadFinite(dtype, bytes, n);
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

namespace {

uint32_t IndexAt(absl::string_view indices, int64_t i) {
  uint32_t v;
  std::memcpy(&v, indices.data() + 4 * i, 4);
  return v;
}

float ValueAt(tessera::v1::DType dtype, absl::string_view data, int64_t i) {
  if (IsHalf(dtype)) return WidenHalf(dtype, HalfAt(data, i));
  float v;
  std::memcpy(&v, data.data() + 4 * i, 4);
  return v;
}

}  // namespace

void EncodeTopK(tessera::v1::DType dtype, absl::Span<const float> grad, int64_t k,
                absl::Span<float> residual, std::vector<uint32_t>* scratch,
                std::string* indices, std::string* data) {
  const int64_t n = static_cast<int64_t>(grad.size());
  k = std::clamp<int64_t>(k, n > 0 ? 1 : 0, n);
  for (int64_t i = 0; i < n; ++i) residual[i] += grad[i];
  std::vector<uint32_t>& order = *scratch;
  order.resize(n);
  for (int64_t i = 0; i < n; ++i) order[i] = static_cast<uint32_t>(i);
  if (k < n) {
    // Largest magnitude first; ties broken by position so the choice is
    // deterministic.
    std::nth_element(order.begin(), order.begin() + k, order.end(),
                     [&](uint32_t a, uint32_t b) {
                       const float fa = std::fabs(residual[a]), fb = std::fabs(residual[b]);
                       return fa > fb || (fa == fb && a < b);
                     });
    std::sort(order.begin(), order.begin() + k);
  }
  indices->resize(4 * k);
  data->resize(DTypeSize(dtype) * k);
  for (int64_t j = 0; j < k; ++j) {
    const uint32_t i = order[j];
    std::memcpy(indices->data() + 4 * j, &i, 4);
    const float v = residual[i];
    if (IsHalf(dtype)) {
      const uint16_t h = NarrowToHalf(dtype, v);
      std::memcpy(data->data() + 2 * j, &h, 2);
      residual[i] = v - WidenHalf(dtype, h);
    } else {
      std::memcpy(data->data() + 4 * j, &v, 4);
      residual[i] = 0.0f;
    }
  }
}

absl::Status ValidateSparse(tessera::v1::DType dtype, absl::string_view indices,
                            absl::string_view data, int64_t n) {
  const int width = DTypeSize(dtype);
  if (width == 0) return absl::InvalidArgumentError("sparse payload: unsupported dtype");
  if (indices.size() % 4 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sparse indices have ", indices.size(), " bytes, not a whole number of uint32"));
  }
  const int64_t count = static_cast<int64_t>(indices.size() / 4);
  if (count > n) {
    return absl::InvalidArgumentError(
        absl::StrCat("sparse payload has ", count, " indices for a block of ", n));
  }
  if (static_cast<int64_t>(data.size()) != count * width) {
    return absl::InvalidArgumentError(absl::StrCat("sparse payload has ", data.size(),
                                                   " value bytes, expected ", count * width,
                                                   " for ", count, " indices"));
  }
  int64_t previous = -1;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t i = IndexAt(indices, j);
    if (i >= n) {
      return absl::InvalidArgumentError(
          absl::StrCat("sparse index ", i, " is outside the block of ", n));
    }
    if (i <= previous) {
      return absl::InvalidArgumentError(
          absl::StrCat("sparse indices are not strictly increasing (", i, " after ", previous,
                       ")"));
    }
    previous = i;
  }
  return absl::OkStatus();
}

void ScatterAddInto(tessera::v1::DType dtype, absl::string_view indices,
                    absl::string_view data, float* acc) {
  const int64_t count = static_cast<int64_t>(indices.size() / 4);
  for (int64_t j = 0; j < count; ++j) acc[IndexAt(indices, j)] += ValueAt(dtype, data, j);
}

}  // namespace tessera
