// Checkpoints through the real binaries: a synchronous run stopped by
// SIGTERM and resumed (into another shard count) ends bit-for-bit where an
// uninterrupted run does; NumPy reads a checkpoint without Tessera code;
// checkpoints on request.

#include <dirent.h>
#include <signal.h>

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

}  // namespace
}  // namespace tessera
