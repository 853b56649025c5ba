// TensorBoard event files through the real binaries: `tessera local
// --logdir` makes worker 0 write them, and an independent reader
// (tests/read_tfevents.py: Python protobuf, its own CRC-32C) finds every
// record intact and every epoch's printed val_loss at the right step.

#include <dirent.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "tests/cluster_util.h"

namespace tessera {
namespace {

using testing_util::Bin;
using testing_util::NewTempDir;
using testing_util::RunProgram;
using testing_util::RunResult;
using testing_util::SourceDir;

// examples/seed_regression.textproto: 800 training samples, 2 workers x
// batch 16, 10 epochs.
constexpr int kStepsPerEpoch = 800 / (2 * 16);
constexpr int kEpochs = 10;

std::vector<std::string> EventFiles(const std::string& dir) {
  std::vector<std::string> out;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      if (absl::StartsWith(e->d_name, "events.out.tfevents.")) out.push_back(dir + "/" + e->d_name);
    }
    closedir(d);
  }
  return out;
}

// epoch number -> val_loss, from the Keras-style lines of the run.
std::map<int, double> PrintedValLosses(const std::string& output) {
  std::map<int, double> out;
  for (absl::string_view line : absl::StrSplit(output, '\n')) {
    int epoch = 0;
    int epochs = 0;
    const std::string text(line);
    if (sscanf(text.c_str(), "epoch %d/%d", &epoch, &epochs) != 2) continue;
    const size_t at = text.find("val_loss: ");
    if (at == std::string::npos) continue;
    out[epoch] = strtod(text.c_str() + at + 10, nullptr);
  }
  return out;
}

struct Scalar {
  int64_t step;
  double value;
};

TEST(TensorBoardTest, WorkerZeroWritesEventsThatAnIndependentReaderParses) {
  const std::string dir = NewTempDir("tensorboard");
  const std::string logdir = dir + "/tb";
  RunResult run = RunProgram(
      {Bin("tessera"), "local", "--job=" + SourceDir() + "/examples/seed_regression.textproto",
       "--log_dir=" + dir, "--logdir=" + logdir},
      dir, absl::Minutes(3));
  ASSERT_EQ(run.status, 0) << run.output;
  const std::map<int, double> printed = PrintedValLosses(run.output);
  ASSERT_EQ(printed.size(), static_cast<size_t>(kEpochs)) << run.output;

  // Only worker 0 writes, one file.
  const std::vector<std::string> files = EventFiles(logdir);
  ASSERT_EQ(files.size(), 1u) << "event files in " << logdir;

  RunResult read =
      RunProgram({"/usr/bin/python3", SourceDir() + "/tests/read_tfevents.py", files[0]}, dir,
                 absl::Minutes(1));
  ASSERT_EQ(read.status, 0) << read.output
                            << "\n(the reader needs the Debian package python3-protobuf; "
                               "`make deps` installs it)";

  std::vector<std::string> lines = absl::StrSplit(read.output, '\n', absl::SkipEmpty());
  ASSERT_FALSE(lines.empty());
  EXPECT_EQ(lines[0], "file_version brain.Event:2");
  std::map<std::string, std::vector<Scalar>> scalars;
  for (size_t i = 1; i < lines.size(); ++i) {
    std::istringstream in(lines[i]);
    std::string kind, tag;
    Scalar s{};
    ASSERT_TRUE(in >> kind >> s.step >> tag >> s.value) << lines[i];
    ASSERT_EQ(kind, "scalar") << lines[i];
    scalars[tag].push_back(s);
  }

  // Every epoch's val_loss, as printed (4 decimals), at the global step that
  // ends the epoch.
  const std::vector<Scalar>& val = scalars["epoch/val_loss"];
  ASSERT_EQ(val.size(), static_cast<size_t>(kEpochs)) << read.output;
  for (int e = 1; e <= kEpochs; ++e) {
    const Scalar& s = val[e - 1];
    EXPECT_EQ(s.step, static_cast<int64_t>(e) * kStepsPerEpoch) << "epoch " << e;
    EXPECT_NEAR(s.value, printed.at(e), 5.1e-5) << "epoch " << e;
  }
  // One train/loss per step, steps 1..N in order.
  const std::vector<Scalar>& train = scalars["train/loss"];
  ASSERT_EQ(train.size(), static_cast<size_t>(kEpochs * kStepsPerEpoch));
  for (size_t i = 0; i < train.size(); ++i) {
    EXPECT_EQ(train[i].step, static_cast<int64_t>(i) + 1);
    EXPECT_TRUE(std::isfinite(train[i].value));
  }
  for (const char* tag : {"epoch/loss", "epoch/samples_per_sec", "epoch/learning_rate"}) {
    ASSERT_EQ(scalars[tag].size(), static_cast<size_t>(kEpochs)) << tag;
  }
  for (const Scalar& s : scalars["epoch/learning_rate"]) EXPECT_NEAR(s.value, 0.001, 1e-9);
  for (const Scalar& s : scalars["epoch/samples_per_sec"]) EXPECT_GT(s.value, 0);
  // Regression: no accuracy.
  EXPECT_EQ(scalars.count("epoch/val_accuracy"), 0u);
}

TEST(TensorBoardTest, ReaderRejectsACorruptRecord) {
  const std::string dir = NewTempDir("tensorboard-corrupt");
  // A well-formed empty record (length 0, masked CRCs) followed by one whose
  // data CRC is wrong.
  std::string file = dir + "/events.out.tfevents.0.corrupt";
  std::string bytes;
  const unsigned char good[] = {0,    0,    0,    0,    0,    0,    0,    0,
                                0x29, 0x03, 0x98, 0x07, 0xd8, 0xea, 0x82, 0xa2};
  bytes.append(reinterpret_cast<const char*>(good), sizeof(good));
  const unsigned char bad[] = {3,    0,    0,   0,   0,   0, 0, 0, 0xb0, 0x99,
                               0x49, 0x0e, 'a', 'b', 'c', 0, 0, 0, 0};
  bytes.append(reinterpret_cast<const char*>(bad), sizeof(bad));
  testing_util::WriteFile(file, bytes);
  RunResult read = RunProgram({"/usr/bin/python3", SourceDir() + "/tests/read_tfevents.py", file},
                              dir, absl::Minutes(1));
  EXPECT_EQ(read.status, 1) << read.output;
  EXPECT_TRUE(absl::StrContains(read.output, "byte 16: data CRC mismatch")) << read.output;
}

}  // namespace
}  // namespace tessera
