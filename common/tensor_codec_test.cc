#include "common/tensor_codec.h"

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "absl/types/span.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

TEST(DTypeSizeTest, KnownSizes) {
  EXPECT_EQ(DTypeSize(tessera::v1::F32), 4);
  EXPECT_EQ(DTypeSize(tessera::v1::BF16), 2);
  EXPECT_EQ(DTypeSize(tessera::v1::F16), 2);
  EXPECT_EQ(DTypeSize(tessera::v1::DTYPE_UNSPECIFIED), 0);
}

TEST(TensorCodecTest, RoundTripPreservesExactBits) {
  const std::vector<float> values = {
      0.0f,
      -0.0f,
      1.0f,
      -1.5f,
      3.14159265f,
      std::numeric_limits<float>::denorm_min(),
      -std::numeric_limits<float>::denorm_min(),
      FromBits(0x007fffffu),  // largest denormal
      FLT_MIN,
      FLT_MAX,
      -FLT_MAX,
      1e30f,
      -1e-30f,
      FromBits(0x3eaaaaabu),  // 1/3 rounded
  };
  std::string bytes;
  EncodeF32(values, &bytes);
  ASSERT_EQ(bytes.size(), values.size() * sizeof(float));

  std::vector<float> decoded(values.size(), 42.0f);
  ASSERT_TRUE(DecodeF32(tessera::v1::F32, bytes, absl::MakeSpan(decoded)).ok());
  for (size_t i = 0; i < values.size(); ++i) {
    EXPECT_EQ(Bits(decoded[i]), Bits(values[i])) << "index " << i;
  }
  // Negative zero compares equal to zero; only the bits tell them apart.
  EXPECT_EQ(Bits(decoded[1]), 0x80000000u);
  EXPECT_EQ(Bits(decoded[0]), 0x00000000u);
}

TEST(TensorCodecTest, RoundTripPreservesNonFiniteBits) {
  const std::vector<float> values = {
      std::numeric_limits<float>::infinity(),
      -std::numeric_limits<float>::infinity(),
      FromBits(0x7fc00001u),  // quiet NaN with a payload
      FromBits(0xffc00000u),  // negative quiet NaN
  };
  std::string bytes;
  EncodeF32(values, &bytes);
  std::vector<float> decoded(values.size());
  ASSERT_TRUE(DecodeF32(tessera::v1::F32, bytes, absl::MakeSpan(decoded)).ok());
  for (size_t i = 0; i < values.size(); ++i) {
    EXPECT_EQ(Bits(decoded[i]), Bits(values[i])) << "index " << i;
  }
}

TEST(TensorCodecTest, EncodesLittleEndian) {
  std::string bytes;
  EncodeF32(std::vector<float>{1.0f}, &bytes);
  ASSERT_EQ(bytes.size(), 4u);
  EXPECT_EQ(static_cast<uint8_t>(bytes[0]), 0x00);
  EXPECT_EQ(static_cast<uint8_t>(bytes[1]), 0x00);
  EXPECT_EQ(static_cast<uint8_t>(bytes[2]), 0x80);
  EXPECT_EQ(static_cast<uint8_t>(bytes[3]), 0x3f);

  // -2.0f is 0xc0000000; 0.1f is 0x3dcccccd.
  EncodeF32(std::vector<float>{-2.0f, 0.1f}, &bytes);
  ASSERT_EQ(bytes.size(), 8u);
  EXPECT_EQ(bytes, std::string("\x00\x00\x00\xc0\xcd\xcc\xcc\x3d", 8));
}

TEST(TensorCodecTest, DecodesLittleEndianBytes) {
  const std::string bytes("\x00\x00\x80\x3f\x00\x00\x00\xc0", 8);
  std::vector<float> out(2);
  ASSERT_TRUE(DecodeF32(tessera::v1::F32, bytes, absl::MakeSpan(out)).ok());
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
}

TEST(TensorCodecTest, EncodeReplacesPreviousContents) {
  std::string bytes(100, 'x');
  EncodeF32(std::vector<float>{1.0f, 2.0f}, &bytes);
  ASSERT_EQ(bytes.size(), 8u);
  std::vector<float> out(2);
  ASSERT_TRUE(DecodeF32(tessera::v1::F32, bytes, absl::MakeSpan(out)).ok());
  EXPECT_EQ(out, (std::vector<float>{1.0f, 2.0f}));

  EncodeF32(absl::Span<const float>(), &bytes);
  EXPECT_TRUE(bytes.empty());
}

TEST(TensorCodecTest, EmptyRoundTrip) {
  std::string bytes;
  EncodeF32(absl::Span<const float>(), &bytes);
  EXPECT_TRUE(bytes.empty());
  std::vector<float> out;
  EXPECT_TRUE(DecodeF32(tessera::v1::F32, bytes, absl::MakeSpan(out)).ok());
}

TEST(TensorCodecTest, WrongLengthIsInvalidArgumentAndLeavesOutputAlone) {
  std::string bytes;
  EncodeF32(std::vector<float>{1.0f, 2.0f, 3.0f}, &bytes);
  for (size_t size : {size_t{0}, size_t{4}, size_t{11}, size_t{13}, size_t{16}}) {
    std::string payload = bytes;
    payload.resize(size, '\x01');
    std::vector<float> out(3, 7.0f);
    absl::Status status =
        DecodeF32(tessera::v1::F32, payload, absl::MakeSpan(out));
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument)
        << "payload size " << size;
    EXPECT_EQ(out, std::vector<float>(3, 7.0f)) << "payload size " << size;
  }
}

TEST(TensorCodecTest, NonF32DTypeIsInvalidArgumentAndLeavesOutputAlone) {
  std::string bytes;
  EncodeF32(std::vector<float>{1.0f, 2.0f}, &bytes);
  for (tessera::v1::DType dtype :
       {tessera::v1::DTYPE_UNSPECIFIED, tessera::v1::BF16, tessera::v1::F16}) {
    std::vector<float> out(2, -9.0f);
    absl::Status status = DecodeF32(dtype, bytes, absl::MakeSpan(out));
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument)
        << tessera::v1::DType_Name(dtype);
    EXPECT_EQ(out, std::vector<float>(2, -9.0f))
        << tessera::v1::DType_Name(dtype);
  }
  // A 16-bit payload whose length would match two 16-bit elements of a
  // four-element output is still refused.
  std::vector<float> out(1, -9.0f);
  EXPECT_EQ(DecodeF32(tessera::v1::BF16, std::string(4, '\0'),
                      absl::MakeSpan(out))
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(out[0], -9.0f);
}

TEST(AllFiniteTest, TrueForFiniteValues) {
  EXPECT_TRUE(AllFinite(absl::Span<const float>()));
  EXPECT_TRUE(AllFinite(std::vector<float>{0.0f}));
  EXPECT_TRUE(AllFinite(std::vector<float>{
      0.0f, -0.0f, 1.0f, -1.0f, FLT_MAX, -FLT_MAX, FLT_MIN,
      std::numeric_limits<float>::denorm_min(), 1e38f, -3.5e-42f}));
  // Many large values: their sum would overflow, but each one is finite.
  EXPECT_TRUE(AllFinite(std::vector<float>(1000, FLT_MAX)));
  EXPECT_TRUE(AllFinite(std::vector<float>(1001, -FLT_MAX)));
}

TEST(AllFiniteTest, FalseForAnyNonFiniteValueAtAnyPosition) {
  const float bad_values[] = {
      std::numeric_limits<float>::quiet_NaN(),
      std::numeric_limits<float>::infinity(),
      -std::numeric_limits<float>::infinity(),
  };
  // Odd and even lengths, short and long enough to exercise vector loops.
  for (size_t n : {size_t{1}, size_t{2}, size_t{7}, size_t{64}, size_t{1027}}) {
    std::vector<size_t> positions = {0, n / 2, n - 1};
    for (float bad : bad_values) {
      for (size_t pos : positions) {
        std::vector<float> values(n);
        for (size_t i = 0; i < n; ++i) {
          values[i] = static_cast<float>(i) * 0.25f - 3.0f;
        }
        values[pos] = bad;
        EXPECT_FALSE(AllFinite(values))
            << "value " << bad << " at " << pos << " of " << n;
      }
    }
  }
}

}  // namespace
}  // namespace tessera

namespace tessera {
namespace {

TEST(Bf16CodecTest, RoundTripsRepresentableValuesAndRoundsToNearestEven) {
  // Values with at most 8 significant bits survive exactly.
  const std::vector<float> exact = {0.0f, -0.0f, 1.0f, -2.5f, 0.15625f, 65536.0f, -0.75f};
  std::string bytes;
  EncodeBF16(exact, &bytes);
  ASSERT_EQ(bytes.size(), exact.size() * 2);
  std::vector<float> back(exact.size());
  ASSERT_TRUE(DecodeF32(tessera::v1::BF16, bytes, absl::MakeSpan(back)).ok());
  EXPECT_EQ(back, exact);
  // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: it goes to the even one (1);
  // 1 + 3 * 2^-8 goes up to 1 + 2^-6.
  const std::vector<float> ties = {1.0f + 1.0f / 256, 1.0f + 3.0f / 256};
  EncodeBF16(ties, &bytes);
  ASSERT_TRUE(DecodeF32(tessera::v1::BF16, bytes, absl::MakeSpan(back).subspan(0, 2)).ok());
  EXPECT_EQ(back[0], 1.0f);
  EXPECT_EQ(back[1], 1.0f + 4.0f / 256);
  // Relative error of any normal value is at most 2^-9.
  for (float v : {3.14159f, -123.456f, 1e-20f, 7e30f}) {
    std::string one;
    EncodeBF16({&v, 1}, &one);
    float w;
    ASSERT_TRUE(DecodeF32(tessera::v1::BF16, one, absl::MakeSpan(&w, 1)).ok());
    EXPECT_LE(std::abs(w - v), std::abs(v) / 512) << v;
  }
}

TEST(Bf16CodecTest, FinitenessAccumulationAndSizeChecks) {
  std::vector<float> v = {1.0f, 2.0f, 3.0f, 4.0f};
  std::string bytes;
  EncodeBF16(v, &bytes);
  EXPECT_TRUE(PayloadFinite(tessera::v1::BF16, bytes, 4));
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    std::vector<float> w = v;
    w[3] = bad;
    std::string b;
    EncodeBF16(w, &b);
    EXPECT_FALSE(PayloadFinite(tessera::v1::BF16, b, 4)) << bad;
  }
  std::vector<float> acc = {10.0f, 10.0f, 10.0f, 10.0f};
  AccumulateInto(tessera::v1::BF16, bytes, acc.data(), 4);
  EXPECT_EQ(acc, (std::vector<float>{11.0f, 12.0f, 13.0f, 14.0f}));
  std::string f32;
  EncodeF32(v, &f32);
  AccumulateInto(tessera::v1::F32, f32, acc.data(), 4);
  EXPECT_EQ(acc, (std::vector<float>{12.0f, 14.0f, 16.0f, 18.0f}));
  std::vector<float> out(3, -1.0f);
  EXPECT_EQ(DecodeF32(tessera::v1::BF16, bytes, absl::MakeSpan(out)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(out, (std::vector<float>(3, -1.0f)));
}

float F16RoundTrip(float v) {
  std::string one;
  EncodeF16({&v, 1}, &one);
  EXPECT_EQ(one.size(), 2u);
  float w = -7.0f;
  EXPECT_TRUE(DecodeF32(tessera::v1::F16, one, absl::MakeSpan(&w, 1)).ok());
  return w;
}

uint16_t F16Bits(float v) {
  std::string one;
  EncodeF16({&v, 1}, &one);
  uint16_t h;
  std::memcpy(&h, one.data(), 2);
  return h;
}

TEST(F16CodecTest, RoundTripsRepresentableValuesAndRoundsToNearestEven) {
  const float min_normal = std::ldexp(1.0f, -14), min_subnormal = std::ldexp(1.0f, -24);
  for (float v : {0.0f, -0.0f, 1.0f, -2.5f, 65504.0f, -65504.0f, 1.0f + 1.0f / 1024,
                  min_normal, min_subnormal, 3 * min_subnormal, -1023 * min_subnormal,
                  0.333251953125f}) {
    EXPECT_EQ(F16RoundTrip(v), v) << v;
    EXPECT_EQ(std::signbit(F16RoundTrip(v)), std::signbit(v)) << v;
  }
  EXPECT_EQ(F16Bits(1.0f), 0x3c00);
  EXPECT_EQ(F16Bits(-2.0f), 0xc000);
  EXPECT_EQ(F16Bits(65504.0f), 0x7bff);
  EXPECT_EQ(F16Bits(min_subnormal), 0x0001);
  // Ties go to the even neighbour: 1 + 2^-11 to 1, 1 + 3 * 2^-11 to 1 + 2^-9.
  EXPECT_EQ(F16RoundTrip(1.0f + std::ldexp(1.0f, -11)), 1.0f);
  EXPECT_EQ(F16RoundTrip(1.0f + 3 * std::ldexp(1.0f, -11)), 1.0f + std::ldexp(1.0f, -9));
  // In the subnormals too: half the smallest goes to 0, 1.5 units to 2.
  EXPECT_EQ(F16RoundTrip(std::ldexp(1.0f, -25)), 0.0f);
  EXPECT_EQ(F16RoundTrip(1.5f * min_subnormal), 2 * min_subnormal);
  EXPECT_EQ(F16RoundTrip(1.25f * min_subnormal), min_subnormal);
  // Rounding up out of the subnormals gives the smallest normal.
  EXPECT_EQ(F16RoundTrip(min_normal - 0.25f * min_subnormal), min_normal);
  // The range ends at 65504: 65519 rounds down to it, 65520 and more are infinite.
  EXPECT_EQ(F16RoundTrip(65519.0f), 65504.0f);
  EXPECT_EQ(F16RoundTrip(65520.0f), std::numeric_limits<float>::infinity());
  EXPECT_EQ(F16RoundTrip(-1e30f), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(F16RoundTrip(std::numeric_limits<float>::quiet_NaN())));
  // Relative error of any value in the normal range is at most 2^-11.
  for (float v : {3.14159f, -123.456f, 0.001f, 60000.0f}) {
    EXPECT_LE(std::abs(F16RoundTrip(v) - v), std::abs(v) / 2048) << v;
  }
}

#if defined(__FLT16_MAX__)
// Against the compiler's own binary16 conversions: every F16 bit pattern
// decodes as they do, and a spread of a million floats (every sign,
// exponent and rounding case) encodes as they do.
TEST(F16CodecTest, MatchesTheCompilersFloat16) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    _Float16 x;
    std::memcpy(&x, &bits, 2);
    const float want = static_cast<float>(x);
    std::string payload(reinterpret_cast<const char*>(&bits), 2);
    float got;
    ASSERT_TRUE(DecodeF32(tessera::v1::F16, payload, absl::MakeSpan(&got, 1)).ok());
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << h;
    } else {
      EXPECT_EQ(std::memcmp(&got, &want, 4), 0) << "bits " << h << ": " << got << " vs " << want;
    }
  }
  int mismatches = 0;
  for (uint64_t u = 0; u <= 0xffffffffull; u += 4093) {
    const uint32_t u32 = static_cast<uint32_t>(u);
    float f;
    std::memcpy(&f, &u32, 4);
    const _Float16 x = static_cast<_Float16>(f);
    uint16_t want;
    std::memcpy(&want, &x, 2);
    const uint16_t got = F16Bits(f);
    const bool both_nan = std::isnan(f) && (got & 0x7c00) == 0x7c00 && (got & 0x3ff) != 0;
    if (got != want && !both_nan && ++mismatches <= 5) {
      ADD_FAILURE() << "float bits " << u32 << " (" << f << "): " << got << ", compiler " << want;
    }
  }
  EXPECT_EQ(mismatches, 0);
}
#endif

TEST(F16CodecTest, FinitenessLimitsAccumulationAndTopK) {
  std::vector<float> v = {1.0f, -2.0f, 65504.0f, 0.5f};
  std::string bytes;
  EncodeF16(v, &bytes);
  EXPECT_TRUE(PayloadFinite(tessera::v1::F16, bytes, 4));
  EXPECT_TRUE(PayloadWithinGradientLimit(tessera::v1::F16, bytes, 4));
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), 1e6f, -70000.0f}) {
    std::vector<float> w = v;
    w[1] = bad;
    std::string b;
    EncodeF16(w, &b);
    EXPECT_FALSE(PayloadFinite(tessera::v1::F16, b, 4)) << bad;
    EXPECT_FALSE(PayloadWithinGradientLimit(tessera::v1::F16, b, 4)) << bad;
  }
  std::vector<float> acc = {10.0f, 10.0f, 10.0f, 10.0f};
  AccumulateInto(tessera::v1::F16, bytes, acc.data(), 4);
  EXPECT_EQ(acc, (std::vector<float>{11.0f, 8.0f, 65514.0f, 10.5f}));
  // Encode and Encode-to-memory write the same bytes as EncodeF16.
  std::string generic;
  Encode(tessera::v1::F16, v, &generic);
  EXPECT_EQ(generic, bytes);
  std::string into(8, '\0');
  EncodeTo(tessera::v1::F16, v, absl::MakeSpan(into.data(), into.size()));
  EXPECT_EQ(into, bytes);
  // Top-k in F16 keeps each sent value's rounding error as residual.
  std::vector<float> residual(2, 0.0f);
  std::vector<uint32_t> scratch;
  std::string indices, data;
  const std::vector<float> grad = {1.0f + std::ldexp(1.0f, -12), 3.0f};
  EncodeTopK(tessera::v1::F16, grad, 2, absl::MakeSpan(residual), &scratch, &indices, &data);
  EXPECT_EQ(data.size(), 4u);
  EXPECT_EQ(residual[0], std::ldexp(1.0f, -12));
  EXPECT_EQ(residual[1], 0.0f);
  std::vector<float> scattered(2, 0.0f);
  ASSERT_TRUE(ValidateSparse(tessera::v1::F16, indices, data, 2).ok());
  ScatterAddInto(tessera::v1::F16, indices, data, scattered.data());
  EXPECT_EQ(scattered, (std::vector<float>{1.0f, 3.0f}));
}

std::vector<uint32_t> Indices(const std::string& bytes) {
  std::vector<uint32_t> out(bytes.size() / 4);
  std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

std::vector<float> Values(const std::string& bytes) {
  std::vector<float> out(bytes.size() / 4);
  std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

TEST(TopKTest, SendsTheLargestMagnitudesAndKeepsTheRestAsResidual) {
  const std::vector<float> grad = {0.1f, -5.0f, 0.2f, 3.0f, -0.3f, 4.0f};
  std::vector<float> residual(6, 0.0f);
  residual[0] = 10.0f;  // carried over: 0.1 + 10 is now the largest
  std::vector<uint32_t> scratch;
  std::string indices, data;
  EncodeTopK(tessera::v1::F32, grad, 3, absl::MakeSpan(residual), &scratch, &indices, &data);
  EXPECT_EQ(Indices(indices), (std::vector<uint32_t>{0, 1, 5}));  // increasing
  EXPECT_EQ(Values(data), (std::vector<float>{10.1f, -5.0f, 4.0f}));
  // Sent elements leave nothing behind, the others all of their sum.
  EXPECT_EQ(residual, (std::vector<float>{0.0f, 0.0f, 0.2f, 3.0f, -0.3f, 0.0f}));
  // Next step: the residual 3.0 plus a small gradient wins.
  EncodeTopK(tessera::v1::F32, std::vector<float>(6, 0.5f), 1, absl::MakeSpan(residual),
             &scratch, &indices, &data);
  EXPECT_EQ(Indices(indices), (std::vector<uint32_t>{3}));
  EXPECT_EQ(Values(data), (std::vector<float>{3.5f}));
  // Sent plus residual always equals everything pushed so far.
  std::vector<float> total(6, 0.0f);
  ScatterAddInto(tessera::v1::F32, indices, data, total.data());
  EXPECT_FLOAT_EQ(total[3] + residual[3], 3.0f + 0.5f);
}

TEST(TopKTest, KIsClampedAndBf16KeepsItsRoundingErrorAsResidual) {
  std::vector<float> residual(4, 0.0f);
  std::vector<uint32_t> scratch;
  std::string indices, data;
  const std::vector<float> grad = {1.0f + 1.0f / 1024, 2.0f, 3.0f, 4.0f};
  EncodeTopK(tessera::v1::BF16, grad, 100, absl::MakeSpan(residual), &scratch, &indices, &data);
  EXPECT_EQ(Indices(indices), (std::vector<uint32_t>{0, 1, 2, 3}));
  EXPECT_EQ(data.size(), 8u);
  // 1 + 2^-10 is not a bfloat16 (8 bits of mantissa): it goes as 1.0 and
  // the 2^-10 stays behind.
  EXPECT_EQ(residual[0], 1.0f / 1024);
  EXPECT_EQ(residual[3], 0.0f);
  EncodeTopK(tessera::v1::F32, grad, 0, absl::MakeSpan(residual), &scratch, &indices, &data);
  EXPECT_EQ(Indices(indices).size(), 1u);  // at least one element goes
}

TEST(SparseValidationTest, RefusesMalformedPayloads) {
  auto idx = [](std::vector<uint32_t> v) {
    return std::string(reinterpret_cast<const char*>(v.data()), 4 * v.size());
  };
  const std::string two_values(8, '\0');
  EXPECT_TRUE(ValidateSparse(tessera::v1::F32, idx({0, 7}), two_values, 8).ok());
  EXPECT_TRUE(ValidateSparse(tessera::v1::F32, "", "", 8).ok());
  struct Case {
    const char* name;
    std::string indices, data;
    const char* says;
  };
  const Case cases[] = {
      {"index out of range", idx({0, 8}), two_values, "outside the block"},
      {"not increasing", idx({3, 1}), two_values, "strictly increasing"},
      {"duplicate index", idx({2, 2}), two_values, "strictly increasing"},
      {"too few values", idx({0, 1}), std::string(4, '\0'), "value bytes"},
      {"torn index", idx({0}) + "ab", std::string(4, '\0'), "whole number"},
      {"more indices than elements", idx({0, 1, 2}), std::string(12, '\0'), "for a block of 2"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const int64_t n = std::string(c.name) == "more indices than elements" ? 2 : 8;
    absl::Status s = ValidateSparse(tessera::v1::F32, c.indices, c.data, n);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find(c.says), std::string::npos) << s.message();
  }
}

}  // namespace
}  // namespace tessera
