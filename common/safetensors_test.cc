#include "common/safetensors.h"

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <fstream>

#include "gtest/gtest.h"

namespace tessera {
namespace {

std::string TempPath(const std::string& name) { return ::testing::TempDir() + "/" + name; }

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void WriteAll(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

TEST(SafetensorsTest, RoundTripKeepsEveryBitAndTheMetadata) {
  const std::vector<float> a = {1.0f, -0.0f, 3.5e-39f, -1e30f, 0.25f, 7.0f};
  const std::vector<float> b = {42.0f};
  const std::string path = TempPath("roundtrip.safetensors");
  ASSERT_TRUE(WriteSafetensorsFile(path, {{"w@0", {2, 3}, a}, {"b \"quoted\"", {1}, b}},
                                   {{"step", "12"}, {"note", "line\nbreak"}})
                  .ok());
  EXPECT_NE(access((path + ".tmp").c_str(), F_OK), 0) << "temporary file left behind";
  auto file = ReadSafetensorsFile(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->metadata.at("step"), "12");
  EXPECT_EQ(file->metadata.at("note"), "line\nbreak");
  ASSERT_EQ(file->tensors.size(), 2u);
  EXPECT_EQ(file->tensors.at("w@0").shape, (std::vector<int64_t>{2, 3}));
  ASSERT_EQ(file->tensors.at("w@0").data.size(), a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(std::signbit(file->tensors.at("w@0").data[i]), std::signbit(a[i]));
    EXPECT_EQ(file->tensors.at("w@0").data[i], a[i]);
  }
  EXPECT_EQ(file->tensors.at("b \"quoted\"").data, b);
  // The layout is the published one: 8-byte length, JSON, data; the data
  // section starts 8-byte aligned.
  const std::string bytes = ReadAll(path);
  uint64_t header_len;
  std::memcpy(&header_len, bytes.data(), 8);
  EXPECT_EQ(header_len % 8, 0u);
  EXPECT_EQ(bytes[8], '{');
  EXPECT_EQ(bytes.size(), 8 + header_len + (a.size() + b.size()) * 4);
}

TEST(SafetensorsTest, CorruptionIsDetected) {
  const std::vector<float> a(100, 1.5f);
  const std::string path = TempPath("corrupt.safetensors");
  ASSERT_TRUE(WriteSafetensorsFile(path, {{"t", {100}, a}}, {}).ok());
  const std::string good = ReadAll(path);

  std::string flipped = good;
  flipped[flipped.size() - 7] ^= 0x40;  // one bit in the data section
  WriteAll(path, flipped);
  auto r = ReadSafetensorsFile(path);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(r.status().message().find("checksum"), std::string::npos) << r.status();
  EXPECT_NE(r.status().message().find(path), std::string::npos);

  WriteAll(path, good.substr(0, good.size() - 10));  // truncated
  EXPECT_EQ(ReadSafetensorsFile(path).status().code(), absl::StatusCode::kDataLoss);
  WriteAll(path, good.substr(0, 5));
  EXPECT_EQ(ReadSafetensorsFile(path).status().code(), absl::StatusCode::kDataLoss);
  std::string bad_header = good;
  bad_header[8] = '[';
  WriteAll(path, bad_header);
  EXPECT_EQ(ReadSafetensorsFile(path).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(ReadSafetensorsFile(TempPath("missing.safetensors")).status().code(),
            absl::StatusCode::kNotFound);
}

// The data section's CRC does not cover the header; the header's own
// checksum catches damage that still parses: a digit of a metadata value,
// of a shape or of a byte range.
TEST(SafetensorsTest, DamagedHeaderThatStillParsesIsDetected) {
  const std::vector<float> a(12, 2.0f);
  const std::string path = TempPath("header.safetensors");
  ASSERT_TRUE(WriteSafetensorsFile(path, {{"t", {3, 4}, a}}, {{"step", "1234"}}).ok());
  const std::string good = ReadAll(path);
  ASSERT_TRUE(ReadSafetensorsFile(path).ok());
  struct Edit {
    std::string from, to;
  };
  for (const Edit& e : {Edit{"\"1234\"", "\"1235\""}, Edit{"[3,4]", "[4,3]"},
                        Edit{"[0,48]", "[0,48] "}}) {
    SCOPED_TRACE(e.from + " -> " + e.to);
    std::string bytes = good;
    const size_t at = bytes.find(e.from, 8);
    ASSERT_NE(at, std::string::npos);
    bytes.replace(at, e.from.size(), e.to);
    if (e.to.size() != e.from.size()) {
      // Keep the header length right (drop one padding space at its end).
      uint64_t header_len;
      std::memcpy(&header_len, bytes.data(), 8);
      ASSERT_EQ(bytes[8 + header_len], ' ');
      bytes.erase(8 + header_len, 1);
    }
    WriteAll(path, bytes);
    auto r = ReadSafetensorsFile(path);
    if (e.to == "[0,48] ") {
      // Whitespace changes nothing the header says: still readable.
      EXPECT_TRUE(r.ok()) << r.status();
      continue;
    }
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_NE(r.status().message().find("header checksum"), std::string::npos) << r.status();
  }
}

TEST(SafetensorsTest, ShapeMismatchIsRefusedAndNothingIsWritten) {
  const std::vector<float> a(5, 1.0f);
  const std::string path = TempPath("shape.safetensors");
  auto s = WriteSafetensorsFile(path, {{"t", {2, 3}, a}}, {});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(access(path.c_str(), F_OK), 0);
  // Two tensors under one name would be one JSON key read back.
  s = WriteSafetensorsFile(path, {{"t", {5}, a}, {"t", {5}, a}}, {});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("same name"), std::string::npos) << s;
  EXPECT_NE(access(path.c_str(), F_OK), 0);
}

}  // namespace
}  // namespace tessera
