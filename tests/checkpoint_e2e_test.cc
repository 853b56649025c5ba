// Checkpoints through the real binaries: a synchronous run stopped by
// SIGTERM and resumed (into another shard count) ends bit-for-bit where an
// uninterrupted run does; NumPy reads a checkpoint without Tessera code;
// checkpoints on request and on a timer.

#include <dirent.h>
#include <sys/stat.h>
#include <signal.h>

#include <fstream>
#include <random>
#include <regex>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "tests/cluster_util.h"

namespace tessera {
namespace {

using testing_util::Bin;
using testing_util::NewTempDir;
using testing_util::ReadFile;
using testing_util::RunProgram;
using testing_util::RunResult;
using testing_util::ServerProcess;
using testing_util::SourceDir;

std::string FashionJob() { return SourceDir() + "/examples/fashion_mnist_mlp.textproto"; }

std::vector<std::string> LocalArgs(const std::string& dir, std::vector<std::string> extra) {
  std::vector<std::string> argv = {Bin("tessera"), "local", "--job=" + FashionJob(),
                                   "--workers=2", "--log_dir=" + dir};
  argv.insert(argv.end(), extra.begin(), extra.end());
  return argv;
}

// Names of the step folders in `dir`.
std::vector<std::string> StepDirs(const std::string& dir) {
  std::vector<std::string> out;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      if (absl::StartsWith(e->d_name, "step-")) out.push_back(e->d_name);
    }
    closedir(d);
  }
  std::sort(out.begin(), out.end());
  return out;
}

TEST(CheckpointE2eTest, SigtermThenResumeIntoThreeShardsMatchesUninterrupted) {
  const std::string dir = NewTempDir("resume");
  constexpr int kSteps = 300;
  const std::string steps = absl::StrCat("--max_steps=", kSteps);
  RunResult full = RunProgram(
      LocalArgs(dir, {"--servers=2", steps, "--dump_params=" + dir + "/full.f32"}), dir,
      absl::Minutes(3));
  ASSERT_EQ(full.status, 0) << full.output;

  // Interrupted run: SIGTERM once a few checkpoints exist.
  const std::string ckpt = dir + "/ckpt";
  SpawnOptions opt;
  opt.argv = LocalArgs(dir, {"--servers=2", steps, "--checkpoint_dir=" + ckpt,
                             "--checkpoint_every_steps=7"});
  opt.stdout_path = opt.stderr_path = dir + "/interrupted.log";
  auto local = Subprocess::Spawn(opt);
  ASSERT_TRUE(local.ok());
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (StepDirs(ckpt).size() < 3 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
  ASSERT_GE(StepDirs(ckpt).size(), 3u) << ReadFile(dir + "/interrupted.log");
  (*local)->Signal(SIGTERM);
  std::optional<int> status = (*local)->Wait(absl::Seconds(30));
  ASSERT_TRUE(status.has_value());
  ASSERT_NE(*status, 0) << "the run finished before it could be interrupted";
  const std::string newest = StepDirs(ckpt).back();
  int64_t stopped_at = std::stoll(newest.substr(5));
  ASSERT_LT(stopped_at, kSteps) << ReadFile(dir + "/interrupted.log");

  // Resume with three servers instead of two.
  RunResult resumed = RunProgram(
      LocalArgs(dir, {"--servers=3", steps, "--checkpoint_dir=" + ckpt,
                      "--checkpoint_every_steps=7", "--dump_params=" + dir + "/resumed.f32"}),
      dir, absl::Minutes(3));
  ASSERT_EQ(resumed.status, 0) << resumed.output;
  const std::string server_log = ReadFile(dir + "/server-2.log");
  EXPECT_TRUE(absl::StrContains(server_log, "resumed from")) << server_log;
  EXPECT_FALSE(absl::StrContains(server_log, "(step 0)")) << server_log;

  const std::string a = ReadFile(dir + "/full.f32");
  const std::string b = ReadFile(dir + "/resumed.f32");
  ASSERT_EQ(a.size(), 235146u * 4);
  EXPECT_TRUE(a == b) << "resumed parameters differ from the uninterrupted run";
}

TEST(CheckpointE2eTest, NumpyReadsTheCheckpointWithoutTesseraCode) {
  const std::string dir = NewTempDir("numpy");
  const std::string ckpt = dir + "/ckpt";
  RunResult run = RunProgram(
      LocalArgs(dir, {"--servers=2", "--max_steps=20", "--checkpoint_dir=" + ckpt,
                      "--dump_params=" + dir + "/dump.f32"}),
      dir, absl::Minutes(2));
  ASSERT_EQ(run.status, 0) << run.output;
  ASSERT_EQ(StepDirs(ckpt), std::vector<std::string>{"step-0000000020"});
  RunResult py = RunProgram(
      {"/usr/bin/python3", SourceDir() + "/tests/read_checkpoint.py",
       ckpt + "/step-0000000020",
       "fc0.weight,fc0.bias,fc1.weight,fc1.bias,fc2.weight,fc2.bias", dir + "/numpy.f32"},
      dir, absl::Seconds(60));
  ASSERT_EQ(py.status, 0) << py.output;
  EXPECT_TRUE(absl::StrContains(py.output, "read 235146 parameters from 2 files")) << py.output;
  EXPECT_TRUE(ReadFile(dir + "/numpy.f32") == ReadFile(dir + "/dump.f32"));
}

TEST(CheckpointE2eTest, CheckpointOnRequest) {
  const std::string dir = NewTempDir("request");
  const std::string job = SourceDir() + "/examples/seed_regression.textproto";
  auto server = ServerProcess::Start(
      dir, {"--job=" + job, "--shard=0", "--num_shards=1", "--checkpoint_dir=" + dir + "/ckpt"});
  ASSERT_NE(server, nullptr);
  RunResult r = RunProgram({Bin("tessera"), "checkpoint", server->address()}, dir,
                           absl::Seconds(30));
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(absl::StrContains(r.output, "step 0 -> " + dir + "/ckpt/step-0000000000/shard-0-of-1.safetensors"))
      << r.output;
  auto plain = ServerProcess::Start(dir, {"--job=" + job, "--shard=0", "--num_shards=1"});
  ASSERT_NE(plain, nullptr);
  RunResult off = RunProgram({Bin("tessera"), "checkpoint", plain->address()}, dir,
                             absl::Seconds(30));
  EXPECT_EQ(off.status, 1) << off.output;
  EXPECT_TRUE(absl::StrContains(off.output, "checkpoints are off")) << off.output;
}

// checkpoint.every_seconds: a shard that changed is checkpointed within
// about a period; an idle one is not rewritten.
TEST(CheckpointE2eTest, TimedCheckpointsFollowChangesOnly) {
  const std::string dir = NewTempDir("timed");
  const std::string job = SourceDir() + "/examples/seed_regression.textproto";
  const std::string ckpt = dir + "/ckpt";
  auto server = ServerProcess::Start(
      dir, {"--job=" + job, "--shard=0", "--num_shards=1", "--num_workers=1", "--mode=async",
            "--max_steps=37", "--checkpoint_dir=" + ckpt, "--checkpoint_every_seconds=1"});
  ASSERT_NE(server, nullptr);
  // Nothing has changed yet: no checkpoint after two periods.
  absl::SleepFor(absl::Milliseconds(2500));
  EXPECT_TRUE(StepDirs(ckpt).empty());
  RunResult w = RunProgram({Bin("tessera-worker"), "--rank=0", "--servers=" + server->address(),
                            "--job=" + job, "--num_shards=1", "--num_workers=1", "--mode=async",
                            "--max_steps=37", "--evaluate=false"},
                           dir, absl::Seconds(60));
  ASSERT_EQ(w.status, 0) << w.output;
  // 37 applied pushes: a checkpoint at version 37 appears within a period
  // or two (polled up to 10 s, generous for a loaded machine).
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (absl::Now() < deadline && StepDirs(ckpt) != std::vector<std::string>{"step-0000000037"}) {
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_EQ(StepDirs(ckpt), std::vector<std::string>{"step-0000000037"});
  // Idle again: the file is not rewritten.
  const std::string file = ckpt + "/step-0000000037/shard-0-of-1.safetensors";
  struct stat before {};
  ASSERT_EQ(stat(file.c_str(), &before), 0);
  absl::SleepFor(absl::Milliseconds(2500));
  struct stat after {};
  ASSERT_EQ(stat(file.c_str(), &after), 0);
  EXPECT_EQ(before.st_ino, after.st_ino);
  EXPECT_EQ(StepDirs(ckpt), std::vector<std::string>{"step-0000000037"});
}

}  // namespace
}  // namespace tessera

namespace tessera {
namespace {

// Killed during checkpoint writes at random moments: every restart loads a
// complete checkpoint (never a torn one), never an older one than the last
// restart did, and removes the partial files the kill left.
TEST(CheckpointDurabilityTest, KilledWhileWritingAlwaysRestartsFromACompleteCheckpoint) {
  const std::string dir = NewTempDir("durability");
  // 4 MiB of parameters, a checkpoint after every push: writes are nearly
  // always in flight when the kill comes.
  testing_util::WriteFile(dir + "/job.textproto", R"(
name: "durability"
model: "linear:1048575-1"
loss: MEAN_SQUARED_ERROR
data { format: SYNTHETIC_REGRESSION num_samples: 100 validation_fraction: 0.2 }
optimizer { type: ADAM learning_rate: 0.001 }
consistency { mode: ASYNC }
batch_size: 4
epochs: 1
num_shards: 1
num_workers: 1
block_bytes: 1048576
checkpoint { every_steps: 1 keep: 2 }
)");
  const std::vector<std::string> flags = {"--job=" + dir + "/job.textproto", "--shard=0",
                                          "--epochs=1000", "--checkpoint_dir=" + dir + "/ckpt"};
  std::mt19937 rng(7);
  int64_t last_resumed = -1;
  int interrupted_writes = 0;
  constexpr int kTrials = 6;
  for (int trial = 0; trial < kTrials; ++trial) {
    auto server = ServerProcess::Start(dir, flags);
    ASSERT_NE(server, nullptr) << "restart " << trial << " failed";
    const std::string log = server->log();
    std::smatch m;
    if (std::regex_search(log, m, std::regex(R"(resumed from \S+ \(step (\d+)\))"))) {
      const int64_t step = std::stoll(m[1]);
      EXPECT_GE(step, last_resumed) << "trial " << trial << " went back to an older checkpoint";
      last_resumed = step;
    } else {
      EXPECT_EQ(trial, 0) << "no checkpoint loaded after a kill:\n" << log;
    }
    // A kill mid-write leaves the newest folder without a file; the loader
    // passes over it to the newest complete one, and says so.
    // Push until a few checkpoints were written, then a random while
    // longer, then kill the server without warning.
    SpawnOptions opt;
    opt.argv = {Bin("tessera-worker"), "--job=" + dir + "/job.textproto", "--rank=0",
                "--servers=" + server->address(), "--retry_timeout_s=1", "--epochs=1000",
                "--checkpoint_dir=" + dir + "/ckpt"};
    opt.stdout_path = opt.stderr_path = dir + "/worker.log";
    auto worker = Subprocess::Spawn(opt);
    ASSERT_TRUE(worker.ok());
    const absl::Time deadline = absl::Now() + absl::Seconds(30);
    while (absl::Now() < deadline && !(*worker)->Poll().has_value()) {
      const std::string now = server->log();
      size_t written = 0;
      for (size_t at = now.find("checkpoint at step"); at != std::string::npos;
           at = now.find("checkpoint at step", at + 1)) {
        ++written;
      }
      if (written >= 3) break;
      absl::SleepFor(absl::Milliseconds(5));
    }
    absl::SleepFor(absl::Milliseconds(std::uniform_int_distribution<int>(0, 300)(rng)));
    server->process()->Signal(SIGKILL);
    server->process()->Wait(absl::Seconds(5));
    (*worker)->Signal(SIGKILL);
    for (const std::string& step : StepDirs(dir + "/ckpt")) {
      std::ifstream tmp(dir + "/ckpt/" + step + "/shard-0-of-1.safetensors.tmp");
      if (tmp.good()) ++interrupted_writes;
    }
  }
  std::cout << kTrials << " kills, " << interrupted_writes
            << " of them in the middle of a checkpoint write, newest resumed step "
            << last_resumed << "\n";
  EXPECT_GT(last_resumed, 0);
  // A last restart cleans up whatever the final kill left half-written.
  auto server = ServerProcess::Start(dir, flags);
  ASSERT_NE(server, nullptr);
  for (const std::string& step : StepDirs(dir + "/ckpt")) {
    std::ifstream tmp(dir + "/ckpt/" + step + "/shard-0-of-1.safetensors.tmp");
    EXPECT_FALSE(tmp.good()) << "partial file left in " << step;
  }
}

}  // namespace
}  // namespace tessera
