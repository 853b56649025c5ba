// End to end: `tessera local` starts real servers and workers on 127.0.0.1
// and trains on the real Fashion-MNIST files.

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <regex>

#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "tests/cluster_util.h"

namespace tessera {
namespace {

using testing_util::Bin;
using testing_util::NewTempDir;
using testing_util::ReadFile;
using testing_util::RunProgram;
using testing_util::RunResult;
using testing_util::SourceDir;

constexpr char kFashionLabels[] =
    "/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz";

std::string FashionJob() { return SourceDir() + "/examples/fashion_mnist_mlp.textproto"; }

// A number from the summary JSON: "key": value.
double JsonNumber(const std::string& json, const std::string& key) {
  std::smatch m;
  const std::regex re("\"" + key + "\": ([-0-9.eE+]+)");
  if (!std::regex_search(json, m, re)) {
    ADD_FAILURE() << "no " << key << " in " << json;
    return NAN;
  }
  return std::stod(m[1]);
}

// A --dump_params file: raw little-endian floats.
std::vector<float> ReadFloats(const std::string& path) {
  const std::string bytes = ReadFile(path);
  std::vector<float> out(bytes.size() / sizeof(float));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
  return out;
}

class FashionMnistTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // `make test` installs dataset-fashion-mnist; its absence is a setup
    // error to report, not a reason to pass.
    ASSERT_EQ(access(kFashionLabels, R_OK), 0)
        << "Fashion-MNIST is missing: run `make deps` (package dataset-fashion-mnist)";
    dir_ = NewTempDir("fmnist");
  }

  // Trains with `tessera local` and returns the summary JSON.
  std::string Train(const std::vector<std::string>& flags,
                    const std::string& job = FashionJob()) {
    const std::string summary = dir_ + "/summary.json";
    std::vector<std::string> argv = {Bin("tessera"), "local", "--job=" + job,
                                     "--servers=2", "--log_dir=" + dir_,
                                     "--summary_json=" + summary};
    argv.insert(argv.end(), flags.begin(), flags.end());
    RunResult r = RunProgram(argv, dir_, absl::Minutes(5));
    EXPECT_EQ(r.status, 0) << r.output;
    std::cout << r.output;
    return ReadFile(summary);
  }

  // Trains `steps` synchronous steps with 2 workers and `flags`; returns
  // the parameters and the summary JSON.
  std::pair<std::vector<float>, std::string> SyncSteps(int steps,
                                                       const std::vector<std::string>& flags,
                                                       const std::string& name,
                                                       const std::string& job = FashionJob()) {
    const std::string dump = dir_ + "/" + name + ".f32";
    std::vector<std::string> all = {"--workers=2", absl::StrCat("--max_steps=", steps),
                                    "--mode=sync", "--dump_params=" + dump};
    all.insert(all.end(), flags.begin(), flags.end());
    const std::string summary = Train(all, job);
    return {ReadFloats(dump), summary};
  }

  // Guards a bit-identity check against a vacuous pass: `after` (25 steps)
  // must lie well away from where one step with the same flags leaves the
  // parameters.
  void ExpectMovedFromOneStep(const std::vector<float>& after,
                              const std::vector<std::string>& flags,
                              const std::string& job = FashionJob()) {
    const std::vector<float> one = SyncSteps(1, flags, "one-step", job).first;
    ASSERT_EQ(one.size(), after.size());
    double moved = 0;
    for (size_t i = 0; i < after.size(); ++i) moved += std::abs(1.0 * after[i] - one[i]);
    EXPECT_GT(moved / after.size(), 1e-3);
  }

  std::string dir_;
};

TEST_F(FashionMnistTest, SyncReaches085In3Epochs) {
  const std::string json = Train({"--workers=2", "--epochs=3", "--mode=sync"});
  EXPECT_GE(JsonNumber(json, "test_accuracy"), 0.85) << json;
  EXPECT_EQ(JsonNumber(json, "epochs"), 3);
  EXPECT_NE(json.find("\"mode\": \"sync\""), std::string::npos);
  EXPECT_EQ(JsonNumber(json, "duplicate_acks"), 0);
}

TEST_F(FashionMnistTest, AsyncReaches084In3Epochs) {
  const std::string json = Train({"--workers=2", "--epochs=3", "--mode=async"});
  EXPECT_GE(JsonNumber(json, "test_accuracy"), 0.84) << json;
  EXPECT_NE(json.find("\"mode\": \"async\""), std::string::npos);
}

TEST_F(FashionMnistTest, SspReaches084In3Epochs) {
  const std::string json =
      Train({"--workers=2", "--epochs=3", "--mode=ssp", "--staleness=2"});
  EXPECT_GE(JsonNumber(json, "test_accuracy"), 0.84) << json;
  EXPECT_NE(json.find("\"mode\": \"ssp\""), std::string::npos);
}

// BF16 and F16 on the wire: half the bytes of F32 per step (the criterion
// asks for at least 1.6x fewer) and test accuracy within half a point.
TEST_F(FashionMnistTest, HalfPrecisionOnTheWireHalvesTheBytesAndKeepsAccuracy) {
  const std::string f32 = Train({"--workers=2", "--epochs=3", "--mode=sync"});
  for (const auto& [flag, name] : {std::pair<std::string, std::string>{"bf16", "BF16"},
                                   std::pair<std::string, std::string>{"f16", "F16"}}) {
    const std::string half =
        Train({"--workers=2", "--epochs=3", "--mode=sync", "--wire_dtype=" + flag});
    EXPECT_NE(half.find("\"wire_dtype\": \"" + name + "\""), std::string::npos) << half;
    const double ratio =
        JsonNumber(f32, "payload_bytes_per_step") / JsonNumber(half, "payload_bytes_per_step");
    std::cout << "bytes per step f32/" << flag << ": " << ratio << ", accuracy f32 "
              << JsonNumber(f32, "test_accuracy") << " " << flag << " "
              << JsonNumber(half, "test_accuracy") << "\n";
    EXPECT_GE(ratio, 1.6) << flag;
    EXPECT_LE(std::abs(JsonNumber(f32, "test_accuracy") - JsonNumber(half, "test_accuracy")),
              0.005)
        << flag;
  }
}

// Top-k pushes (10% of each block, with error feedback): the push shrinks
// to a fifth (4-byte value + 4-byte index for a tenth of the elements),
// pulls stay dense, and accuracy stays within about a point of dense
// pushes (0.8631 on the reference machine; 0.8545 measured with top-k).
TEST_F(FashionMnistTest, TopKPushesCutTheBytesAndStillLearn) {
  const std::string json =
      Train({"--workers=2", "--epochs=3", "--mode=sync", "--top_k_fraction=0.1"});
  EXPECT_EQ(JsonNumber(json, "top_k_fraction"), 0.1) << json;
  // mlp:784-256-128-10 has 235,146 parameters: a dense F32 step moves
  // 2 x 4 x 235,146 bytes (push and pull); with top-k about 0.6 of that.
  const double dense = 2.0 * 4 * 235146;
  const double ratio = JsonNumber(json, "payload_bytes_per_step") / dense;
  std::cout << "bytes per step top-k 0.1 / dense: " << ratio << "\n";
  EXPECT_GE(ratio, 0.55);
  EXPECT_LE(ratio, 0.62);
  EXPECT_GE(JsonNumber(json, "test_accuracy"), 0.84) << json;
}

// Overlapped compute and exchange through the real binaries: one async
// worker (deterministic) trains with the exchange of step s - 1 in flight
// while step s computes. 0.8554 after 3 epochs on the reference machine
// against 0.8697 without overlap: one step of staleness costs about 1.4
// points here.
TEST_F(FashionMnistTest, OverlappedAsyncWorkerLearns) {
  const std::string json =
      Train({"--workers=1", "--epochs=3", "--mode=async", "--overlap"});
  EXPECT_NE(json.find("\"overlap\": true"), std::string::npos) << json;
  EXPECT_GE(JsonNumber(json, "test_accuracy"), 0.84) << json;
}

TEST_F(FashionMnistTest, SyncTwoWorkersEqualOneWorkerWithDoubleBatch) {
  // Momentum SGD: its update is linear in the gradient, so float rounding in
  // the two ways of averaging stays at rounding size. (Adam divides by
  // sqrt(v), which turns rounding noise in near-zero gradients into full
  // learning-rate steps; the in-process test covers Adam on a small model.)
  std::string text = ReadFile(FashionJob());
  const size_t at = text.find("type: ADAM");
  ASSERT_NE(at, std::string::npos);
  text.replace(at, 10, "type: MOMENTUM momentum: 0.9");
  const std::string job = dir_ + "/momentum.textproto";
  testing_util::WriteFile(job, text);
  auto run = [&](int workers, int batch, int steps, const std::string& name) {
    const std::string dump = dir_ + "/" + name + ".f32";
    Train({absl::StrCat("--workers=", workers), absl::StrCat("--batch_size=", batch),
           "--learning_rate=0.05",
           absl::StrCat("--max_steps=", steps), "--mode=sync", "--dump_params=" + dump},
          job);
    return ReadFloats(dump);
  };
  const std::vector<float> two = run(2, 64, 25, "two");
  const std::vector<float> one = run(1, 128, 25, "one");
  ASSERT_EQ(two.size(), 235146u);
  ASSERT_EQ(one.size(), two.size());
  // Relative error of the whole parameter vector, and element by element in
  // numpy.allclose form (rtol 1e-5, atol 1e-7 for elements near zero).
  double diff2 = 0, norm2 = 0;
  int64_t far = 0;
  for (size_t i = 0; i < one.size(); ++i) {
    const double d = std::abs(1.0 * two[i] - one[i]);
    diff2 += d * d;
    norm2 += 1.0 * one[i] * one[i];
    if (d > 1e-7 + 1e-5 * std::abs(1.0 * one[i])) ++far;
  }
  const double rel = std::sqrt(diff2 / norm2);
  std::cout << "relative error " << rel << ", elements outside allclose: " << far << "\n";
  EXPECT_LE(rel, 1e-5);
  EXPECT_EQ(far, 0);
  // Guard against a vacuous pass: 25 steps moved the parameters well away
  // from where one step leaves them.
  const std::vector<float> early = run(1, 128, 1, "early");
  double moved = 0;
  for (size_t i = 0; i < one.size(); ++i) moved += std::abs(1.0 * one[i] - early[i]);
  EXPECT_GT(moved / one.size(), 1e-3);
}

// --layerwise_push sends each shard as soon as backward is done with its
// parameters. With 4 MiB blocks the first layer's weight lies on shard 0
// and everything else on shard 1, so shard 1's push leaves while the first
// layer's gradient is still being computed; the parameters after 25
// synchronous steps must be bit-identical to pushing after backward.
TEST_F(FashionMnistTest, LayerwisePushLeavesEarlyAndChangesNothing) {
  const std::string job = dir_ + "/blocks.textproto";
  testing_util::WriteFile(job, ReadFile(FashionJob()) + "block_bytes: 4194304\n");
  const auto [layerwise, with] = SyncSteps(25, {"--layerwise_push=true"}, "layerwise", job);
  const auto [whole, without] = SyncSteps(25, {"--layerwise_push=false"}, "whole", job);
  ASSERT_EQ(layerwise.size(), 235146u);
  EXPECT_TRUE(layerwise == whole) << "layerwise pushes changed the parameters";
  EXPECT_GT(JsonNumber(with, "early_shard_pushes"), 0)
      << "no shard push left before backward ended";
  EXPECT_EQ(JsonNumber(without, "early_shard_pushes"), 0);
  ExpectMovedFromOneStep(whole, {}, job);
}

// On the gRPC stream (no shared memory) a layer-wise push goes part by
// part: each parameter's blocks leave once backward is done with it, last
// layer first, so even with the default 256 KiB blocks (every shard holds
// part of the first layer) pushes begin during backward. 25 synchronous
// steps must end bit-identical to pushing after backward.
TEST_F(FashionMnistTest, LayerwisePartsOnTheStreamLeaveEarlyAndChangeNothing) {
  const auto [layerwise, with] =
      SyncSteps(25, {"--shared_memory=false", "--layerwise_push=true"}, "stream-layerwise");
  const auto [whole, without] =
      SyncSteps(25, {"--shared_memory=false", "--layerwise_push=false"}, "stream-whole");
  ASSERT_EQ(layerwise.size(), 235146u);
  EXPECT_TRUE(layerwise == whole) << "layer-wise parts changed the parameters";
  EXPECT_GT(JsonNumber(with, "early_shard_pushes"), 0) << "no push began before backward ended";
  EXPECT_EQ(JsonNumber(without, "early_shard_pushes"), 0);
  ExpectMovedFromOneStep(whole, {"--shared_memory=false"});
}

// Without shared memory, pushes go on the stream with their payloads as
// slices of the buffer they were encoded into (common/session_stream.h),
// here in parts of one 256 KiB block that the server gathers; with it,
// through the region, in one message. The server must read the same
// numbers both ways: 25 synchronous steps end bit-identical, in F32, BF16
// and F16.
TEST_F(FashionMnistTest, StreamAndSharedMemoryPathsGiveIdenticalParameters) {
  for (const std::string dtype : {"f32", "bf16", "f16"}) {
    const std::vector<std::string> flags = {"--wire_dtype=" + dtype, "--stream_part_bytes=1"};
    auto with_shm = [&](bool shm) {
      std::vector<std::string> f = flags;
      f.push_back(absl::StrCat("--shared_memory=", shm ? "true" : "false"));
      return f;
    };
    const auto [stream, stream_summary] = SyncSteps(25, with_shm(false), dtype + "-stream");
    const auto [shm, shm_summary] = SyncSteps(25, with_shm(true), dtype + "-shm");
    ASSERT_EQ(stream.size(), 235146u) << dtype;
    EXPECT_TRUE(stream == shm) << dtype << ": the stream path changed the parameters";
    EXPECT_EQ(JsonNumber(stream_summary, "payload_bytes_per_step"),
              JsonNumber(shm_summary, "payload_bytes_per_step"))
        << dtype;
    ExpectMovedFromOneStep(stream, with_shm(false));
  }
}

TEST(SeedJobTest, PrintsTenEpochsAndValLossFalls) {
  const std::string dir = NewTempDir("seed");
  RunResult r = RunProgram({Bin("tessera"), "local",
                     "--job=" + SourceDir() + "/examples/seed_regression.textproto",
                     "--servers=2", "--workers=2", "--log_dir=" + dir},
                    dir, absl::Minutes(2));
  ASSERT_EQ(r.status, 0) << r.output;
  std::cout << r.output;
  const std::regex line(R"(epoch (\d+)/10 - [0-9.]+s - loss: ([0-9.]+) - val_loss: ([0-9.]+))");
  std::vector<double> val_loss;
  for (absl::string_view l : absl::StrSplit(r.output, '\n')) {
    std::smatch m;
    std::string s(l);
    if (std::regex_search(s, m, line)) {
      EXPECT_EQ(std::stoi(m[1]), static_cast<int>(val_loss.size()) + 1);
      val_loss.push_back(std::stod(m[3]));
    }
  }
  ASSERT_EQ(val_loss.size(), 10u) << r.output;
  EXPECT_LT(val_loss[9], val_loss[0]);
}

// --overlap overrides the job file only when given: a job that sets
// `overlap: true` keeps it without the flag, and --nooverlap turns it off.
TEST(SeedJobTest, OverlapFlagOverridesTheJobOnlyWhenGiven) {
  const std::string dir = NewTempDir("overlap-flag");
  const std::string job = dir + "/job.textproto";
  {
    std::ofstream out(job);
    out << ReadFile(SourceDir() + "/examples/seed_regression.textproto")
        << "\noverlap: true\n";
  }
  auto overlap_of = [&](std::vector<std::string> extra) {
    std::vector<std::string> argv = {Bin("tessera"), "local", "--job=" + job,
                                     "--workers=1", "--epochs=1", "--mode=async",
                                     "--log_dir=" + dir, "--summary_json=" + dir + "/s.json"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    RunResult r = RunProgram(argv, dir, absl::Minutes(2));
    EXPECT_EQ(r.status, 0) << r.output;
    const std::string json = ReadFile(dir + "/s.json");
    if (json.find("\"overlap\": true") != std::string::npos) return std::string("true");
    if (json.find("\"overlap\": false") != std::string::npos) return std::string("false");
    return "missing in " + json;
  };
  EXPECT_EQ(overlap_of({}), "true");
  EXPECT_EQ(overlap_of({"--nooverlap"}), "false");
  EXPECT_EQ(overlap_of({"--overlap=false"}), "false");
}

}  // namespace
}  // namespace tessera
