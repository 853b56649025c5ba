// Health and lifecycle of the real binaries: NOT_SERVING until a server has
// joined the coordinator, SERVING after; a clean exit on SIGTERM during
// training; a server of another job is refused; a CPU without the
// instruction set the build targets is refused before main runs.

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/cluster_util.h"

namespace tessera {
namespace {

using testing_util::Bin;
using testing_util::FreePort;
using testing_util::NewTempDir;
using testing_util::ReadFile;
using testing_util::RunProgram;
using testing_util::RunResult;
using testing_util::ServerProcess;
using testing_util::SourceDir;

std::string SeedJob() { return SourceDir() + "/examples/seed_regression.textproto"; }


RunResult Health(const std::string& address, const std::string& dir) {
  return RunProgram({Bin("tessera"), "health", address}, dir, absl::Seconds(10));
}

// Built for x86-64-v3 or v4, each binary checks the CPU before anything
// else runs (common/cpu_check.cc). TESSERA_TEST_CPU_LACKS pretends that the
// CPU lacks one feature of the level.
TEST(LifecycleTest, BinariesRefuseACpuWithoutTheirInstructionSet) {
  const std::string march = TESSERA_MARCH_RESOLVED;
  if (march != "x86-64-v3" && march != "x86-64-v4") {
    GTEST_SKIP() << "built with -march=" << march << ", which has no start-up check";
  }
  const std::string dir = NewTempDir("cpu_check");
  const std::string lacking = march == "x86-64-v4" ? "avx512bw" : "fma";
  for (const char* name : {"tessera", "tessera-server", "tessera-worker"}) {
    SCOPED_TRACE(name);
    RunResult refused =
        RunProgram({"/usr/bin/env", "TESSERA_TEST_CPU_LACKS=" + lacking, Bin(name), "--help"}, dir,
                   absl::Seconds(10));
    EXPECT_EQ(refused.status, 1) << refused.output;
    EXPECT_TRUE(absl::StrContains(refused.output,
                                  "compiled for " + march + ", and this CPU lacks " + lacking))
        << refused.output;
    EXPECT_TRUE(absl::StrContains(refused.output, "-DTESSERA_MARCH=")) << refused.output;
    EXPECT_FALSE(absl::StrContains(refused.output, "Usage")) << refused.output;
    // A feature outside the level changes nothing; --help then works.
    RunResult ran =
        RunProgram({"/usr/bin/env", "TESSERA_TEST_CPU_LACKS=sse4a", Bin(name), "--help"}, dir,
                   absl::Seconds(10));
    EXPECT_EQ(ran.status, 0) << ran.output;
    EXPECT_TRUE(absl::StrContains(ran.output, "Usage")) << ran.output;
  }
}

TEST(LifecycleTest, NotServingUntilJoinedThenServing) {
  const std::string dir = NewTempDir("health");
  const int coordinator_port = FreePort();
  const std::string coordinator = absl::StrCat("127.0.0.1:", coordinator_port);
  auto shard1 = ServerProcess::Start(
      dir, {"--job=" + SeedJob(), "--shard=1", "--coordinator=" + coordinator});
  ASSERT_NE(shard1, nullptr);
  // Listening, but its coordinator is not up: not ready.
  absl::SleepFor(absl::Milliseconds(300));
  RunResult before = Health(shard1->address(), dir);
  EXPECT_EQ(before.status, 1) << before.output;
  EXPECT_TRUE(absl::StrContains(before.output, "NOT_SERVING")) << before.output;

  auto shard0 = ServerProcess::Start(
      dir, {"--job=" + SeedJob(), "--shard=0", absl::StrCat("--listen=", coordinator)});
  ASSERT_NE(shard0, nullptr);
  EXPECT_EQ(Health(shard0->address(), dir).status, 0);
  RunResult after;
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  do {
    after = Health(shard1->address(), dir);
    if (after.status == 0) break;
    absl::SleepFor(absl::Milliseconds(100));
  } while (absl::Now() < deadline);
  EXPECT_EQ(after.status, 0) << after.output;
  EXPECT_TRUE(absl::StrContains(after.output, ": SERVING")) << after.output;

  // The coordinator lists both shards.
  RunResult status =
      RunProgram({Bin("tessera"), "status", coordinator, "--once"}, dir, absl::Seconds(10));
  EXPECT_EQ(status.status, 0) << status.output;
  EXPECT_TRUE(absl::StrContains(status.output, "2/2 servers")) << status.output;
  // Both shards answered with their stats (no checkpoints in this job).
  EXPECT_FALSE(absl::StrContains(status.output, "(no answer)")) << status.output;
  EXPECT_TRUE(absl::StrContains(status.output, shard1->address())) << status.output;
}

TEST(LifecycleTest, HealthOfNothingFails) {
  const std::string dir = NewTempDir("health-none");
  RunResult r = Health(absl::StrCat("127.0.0.1:", FreePort()), dir);
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(absl::StrContains(r.output, "UNAVAILABLE")) << r.output;
}

TEST(LifecycleTest, ServerOfAnotherJobIsRefused) {
  const std::string dir = NewTempDir("other-job");
  auto shard0 = ServerProcess::Start(dir, {"--job=" + SeedJob(), "--shard=0"});
  ASSERT_NE(shard0, nullptr);
  const absl::Time start = absl::Now();
  RunResult r = RunProgram({Bin("tessera-server"), "--job=" + SeedJob(), "--shard=1",
                            "--seed=999", "--listen=127.0.0.1:0",
                            "--coordinator=" + shard0->address()},
                           dir, absl::Seconds(20));
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  EXPECT_TRUE(absl::StrContains(r.output, "different job")) << r.output;
}

TEST(LifecycleTest, SigtermDuringTrainingExitsZeroQuickly) {
  const std::string dir = NewTempDir("sigterm");
  // Enough epochs that training is still running when the signal arrives.
  const std::vector<std::string> job = {"--job=" + SeedJob(), "--epochs=100000"};
  std::vector<std::string> flags0 = job;
  flags0.push_back("--shard=0");
  auto shard0 = ServerProcess::Start(dir, flags0);
  ASSERT_NE(shard0, nullptr);
  std::vector<std::string> flags1 = job;
  flags1.push_back("--shard=1");
  flags1.push_back("--coordinator=" + shard0->address());
  auto shard1 = ServerProcess::Start(dir, flags1);
  ASSERT_NE(shard1, nullptr);
  std::vector<std::unique_ptr<Subprocess>> workers;
  for (int r = 0; r < 2; ++r) {
    SpawnOptions opt;
    // Workers retry a vanished server; here it is not coming back, so a
    // short retry window makes them give up instead of waiting it out.
    opt.argv = {Bin("tessera-worker"), absl::StrCat("--rank=", r),
                "--servers=" + shard0->address() + "," + shard1->address(),
                "--retry_timeout_s=3"};
    opt.argv.insert(opt.argv.end(), job.begin(), job.end());
    opt.stdout_path = opt.stderr_path = absl::StrCat(dir, "/worker-", r, ".log");
    auto p = Subprocess::Spawn(opt);
    ASSERT_TRUE(p.ok());
    workers.push_back(*std::move(p));
  }
  // Wait until training is under way (worker 0 printed an epoch line).
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (!absl::StrContains(ReadFile(dir + "/worker-0.log"), "epoch 2/") &&
         absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  ASSERT_TRUE(absl::StrContains(ReadFile(dir + "/worker-0.log"), "epoch 2/"))
      << ReadFile(dir + "/worker-0.log");
  ASSERT_FALSE(shard0->process()->Poll().has_value());

  const absl::Time sent = absl::Now();
  shard0->process()->Signal(SIGTERM);
  std::optional<int> status = shard0->process()->Wait(absl::Seconds(10));
  ASSERT_TRUE(status.has_value()) << "server did not exit within 10 s of SIGTERM";
  EXPECT_EQ(*status, 0) << shard0->log();
  EXPECT_LT(absl::Now() - sent, absl::Seconds(10));
  EXPECT_TRUE(absl::StrContains(shard0->log(), "stopped")) << shard0->log();
  // Workers notice the server going away, retry, give up and exit instead
  // of hanging.
  for (auto& w : workers) {
    std::optional<int> ws = w->Wait(absl::Seconds(20));
    ASSERT_TRUE(ws.has_value()) << "a worker hung after its server stopped";
    EXPECT_NE(*ws, 0);
  }
}

}  // namespace
}  // namespace tessera
