#include "worker/event_writer.h"

#include <dirent.h>
#include <stdlib.h>

#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

std::string Bytes(std::initializer_list<int> values) {
  std::string out;
  for (int v : values) out.push_back(static_cast<char>(v));
  return out;
}

uint64_t ReadLittleEndian(const std::string& s, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(s[at + i]);
  return v;
}

std::string NewTempDir() {
  std::string dir = absl::StrCat(::testing::TempDir(), "/events-XXXXXX");
  if (mkdtemp(dir.data()) == nullptr) ADD_FAILURE() << "mkdtemp failed";
  return dir;
}

std::vector<std::string> FilesIn(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      if (e->d_name[0] != '.') names.push_back(e->d_name);
    }
    closedir(d);
  }
  return names;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Splits a TFRecord file into its records' payloads, checking both CRCs.
std::vector<std::string> ParseRecords(const std::string& file) {
  std::vector<std::string> records;
  size_t at = 0;
  while (at < file.size()) {
    if (file.size() - at < 12) {
      ADD_FAILURE() << "truncated header at byte " << at;
      break;
    }
    const uint64_t length = ReadLittleEndian(file, at, 8);
    EXPECT_EQ(ReadLittleEndian(file, at + 8, 4), MaskCrc32c(Crc32c(file.substr(at, 8))))
        << "length CRC at byte " << at;
    if (file.size() - at - 12 < length + 4) {
      ADD_FAILURE() << "truncated record at byte " << at;
      break;
    }
    const std::string data = file.substr(at + 12, length);
    EXPECT_EQ(ReadLittleEndian(file, at + 12 + length, 4), MaskCrc32c(Crc32c(data)))
        << "data CRC at byte " << at;
    records.push_back(data);
    at += 12 + length + 4;
  }
  return records;
}

TEST(Crc32cTest, KnownVectors) {
  // The check value of CRC-32C and the RFC 3720 (iSCSI) test vectors.
  EXPECT_EQ(Crc32c("123456789"), 0xE3069283u);
  EXPECT_EQ(Crc32c(std::string(32, '\0')), 0x8A9136AAu);
  EXPECT_EQ(Crc32c(std::string(32, '\xff')), 0x62A8AB43u);
  std::string ascending;
  for (int i = 0; i < 32; ++i) ascending.push_back(static_cast<char>(i));
  EXPECT_EQ(Crc32c(ascending), 0x46DD794Eu);
  EXPECT_EQ(Crc32c(""), 0u);
}

TEST(Crc32cTest, ExtendsAcrossPieces) { EXPECT_EQ(Crc32c("56789", Crc32c("1234")), 0xE3069283u); }

TEST(Crc32cTest, Mask) {
  EXPECT_EQ(MaskCrc32c(0), 0xa282ead8u);
  // ((0xE3069283 >> 15) | (0xE3069283 << 17)) + 0xa282ead8, modulo 2^32.
  EXPECT_EQ(MaskCrc32c(0xE3069283u), 0xc78ab0e5u);
}

TEST(TfRecordTest, Framing) {
  std::string out = "prefix";
  AppendTfRecord("abc", &out);
  // Computed independently: length 3 (LE uint64), masked CRC of those 8
  // bytes, "abc", masked CRC of "abc".
  EXPECT_EQ(out, "prefix" + Bytes({0x03, 0, 0, 0, 0, 0, 0, 0, 0xb0, 0x99, 0x49, 0x0e, 'a', 'b', 'c',
                                   0x6e, 0x57, 0xf1, 0x21}));
  std::string empty;
  AppendTfRecord("", &empty);
  EXPECT_EQ(empty.size(), 16u);
  EXPECT_EQ(ParseRecords(empty), std::vector<std::string>{""});
}

TEST(EventWriterTest, WritesVersionThenScalars) {
  const std::string dir = NewTempDir() + "/nested/logdir";
  std::string path;
  {
    auto writer = EventWriter::Create(dir);
    ASSERT_TRUE(writer.ok()) << writer.status();
    path = (*writer)->path();
    ASSERT_TRUE((*writer)->AddScalar("train/loss", 1, 0.5).ok());
    ASSERT_TRUE((*writer)->AddScalar("epoch/val_loss", 25, 0.25).ok());
    ASSERT_TRUE((*writer)->AddScalar("train/loss", 2, 1e30).ok());
    ASSERT_TRUE((*writer)->Flush().ok());
  }
  const std::vector<std::string> files = FilesIn(dir);
  ASSERT_EQ(files.size(), 1u);
  EXPECT_TRUE(absl::StartsWith(files[0], "events.out.tfevents.")) << files[0];
  EXPECT_EQ(path, dir + "/" + files[0]);

  const std::vector<std::string> records = ParseRecords(ReadFile(path));
  ASSERT_EQ(records.size(), 4u);
  tessera::tensorboard::Event event;
  ASSERT_TRUE(event.ParseFromString(records[0]));
  EXPECT_EQ(event.file_version(), "brain.Event:2");
  EXPECT_GT(event.wall_time(), 1.6e9);

  struct Expected {
    std::string tag;
    int64_t step;
    float value;
  };
  const std::vector<Expected> expected = {
      {"train/loss", 1, 0.5f}, {"epoch/val_loss", 25, 0.25f}, {"train/loss", 2, 1e30f}};
  for (size_t i = 0; i < expected.size(); ++i) {
    tessera::tensorboard::Event e;
    ASSERT_TRUE(e.ParseFromString(records[i + 1]));
    ASSERT_TRUE(e.has_summary()) << i;
    EXPECT_EQ(e.step(), expected[i].step);
    ASSERT_EQ(e.summary().value_size(), 1);
    EXPECT_EQ(e.summary().value(0).tag(), expected[i].tag);
    EXPECT_EQ(e.summary().value(0).simple_value(), expected[i].value);
    EXPECT_GE(e.wall_time(), event.wall_time());
  }
}

TEST(EventWriterTest, SecondWriterInTheSameFolderGetsItsOwnFile) {
  const std::string dir = NewTempDir();
  auto a = EventWriter::Create(dir);
  auto b = EventWriter::Create(dir);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_NE((*a)->path(), (*b)->path());
  EXPECT_EQ(FilesIn(dir).size(), 2u);
}

TEST(EventWriterTest, ErrorsNameTheFolder) {
  const std::string dir = NewTempDir();
  const std::string file = dir + "/plain-file";
  std::ofstream(file) << "x";
  auto under_file = EventWriter::Create(file + "/logs");
  ASSERT_FALSE(under_file.ok());
  EXPECT_EQ(under_file.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(under_file.status().message(), file + "/logs"))
      << under_file.status();
  EXPECT_EQ(EventWriter::Create("").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tessera
