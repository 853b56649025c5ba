// Process faults with the real binaries on 127.0.0.1: a server killed and
// restarted from its checkpoint, a frozen server, a worker killed inside a
// synchronous step, a synchronous worker killed and restarted, a frozen
// worker with a backup worker, a rerun against finished servers. Training
// must finish; nobody may hang.

#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <regex>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "proto/tessera.grpc.pb.h"
#include "tests/cluster_util.h"

namespace tessera {
namespace {

using testing_util::Bin;
using testing_util::FreePort;
using testing_util::NewTempDir;
using testing_util::ReadFile;
using testing_util::SourceDir;


// A two-server, two-worker synchronous Fashion-MNIST cluster whose
// processes the test can kill, freeze and restart.
class FaultTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = NewTempDir("fault");
    ports_ = {FreePort(), FreePort()};
    job_ = {"--job=" + SourceDir() + "/examples/fashion_mnist_mlp.textproto",
            "--checkpoint_dir=" + dir_ + "/ckpt", "--checkpoint_every_steps=5"};
  }

  std::unique_ptr<Subprocess> StartServer(int shard, const std::string& log) {
    SpawnOptions opt;
    opt.argv = {Bin("tessera-server"), absl::StrCat("--shard=", shard),
                absl::StrCat("--listen=127.0.0.1:", ports_[shard])};
    if (shard > 0) opt.argv.push_back(absl::StrCat("--coordinator=127.0.0.1:", ports_[0]));
    opt.argv.insert(opt.argv.end(), job_.begin(), job_.end());
    opt.argv.insert(opt.argv.end(), extra_.begin(), extra_.end());
    opt.stdout_path = opt.stderr_path = dir_ + "/" + log;
    auto p = Subprocess::Spawn(opt);
    EXPECT_TRUE(p.ok()) << p.status();
    return p.ok() ? *std::move(p) : nullptr;
  }

  std::unique_ptr<Subprocess> StartWorker(int rank) {
    SpawnOptions opt;
    opt.argv = {Bin("tessera-worker"), absl::StrCat("--rank=", rank),
                absl::StrCat("--servers=127.0.0.1:", ports_[0], ",127.0.0.1:", ports_[1]),
                absl::StrCat("--summary_json=", dir_, "/summary-", rank, ".json")};
    opt.argv.insert(opt.argv.end(), job_.begin(), job_.end());
    opt.argv.insert(opt.argv.end(), extra_.begin(), extra_.end());
    opt.argv.insert(opt.argv.end(), worker_extra_.begin(), worker_extra_.end());
    opt.stdout_path = opt.stderr_path = absl::StrCat(dir_, "/worker-", rank, ".log");
    auto p = Subprocess::Spawn(opt);
    EXPECT_TRUE(p.ok()) << p.status();
    return p.ok() ? *std::move(p) : nullptr;
  }

  void StartCluster() {
    servers_.push_back(StartServer(0, "server-0.log"));
    servers_.push_back(StartServer(1, "server-1.log"));
    for (int r = 0; r < 2; ++r) workers_.push_back(StartWorker(r));
  }

  // Waits until `path` contains `text`.
  bool WaitFor(const std::string& path, const std::string& text, absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    while (absl::Now() < deadline) {
      if (absl::StrContains(ReadFile(path), text)) return true;
      absl::SleepFor(absl::Milliseconds(10));
    }
    return false;
  }

  tessera::v1::ShardStatsResponse Stats(int shard) {
    auto stub = tessera::v1::ParameterService::NewStub(grpc::CreateChannel(
        absl::StrCat("127.0.0.1:", ports_[shard]), grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    tessera::v1::ShardStatsResponse out;
    const grpc::Status s = stub->ShardStats(&ctx, {}, &out);
    EXPECT_TRUE(s.ok()) << "shard " << shard << ": " << s.error_message();
    return out;
  }

  // A number from worker `rank`'s --summary_json; -1 when missing.
  double SummaryNumber(int rank, const std::string& key) {
    std::smatch m;
    const std::string json = ReadFile(absl::StrCat(dir_, "/summary-", rank, ".json"));
    if (!std::regex_search(json, m, std::regex("\"" + key + "\": ([0-9.]+)"))) return -1;
    return std::stod(m[1]);
  }

  double TestAccuracy(int rank) { return SummaryNumber(rank, "test_accuracy"); }

  std::string dir_;
  std::vector<int> ports_;
  std::vector<std::string> job_;
  std::vector<std::string> extra_;         // servers and workers
  std::vector<std::string> worker_extra_;  // workers only
  std::vector<std::unique_ptr<Subprocess>> servers_;
  std::vector<std::unique_ptr<Subprocess>> workers_;
};

TEST_F(FaultTest, ServerKilledAndRestartedFromCheckpoint) {
  extra_ = {"--max_steps=400"};
  StartCluster();
  // Kill shard 1 once it has written its second checkpoint.
  ASSERT_TRUE(WaitFor(dir_ + "/server-1.log", "checkpoint at step 10", absl::Seconds(60)))
      << ReadFile(dir_ + "/server-1.log");
  servers_[1]->Signal(SIGKILL);
  servers_[1]->Wait(absl::Seconds(5));
  absl::SleepFor(absl::Seconds(1));
  const absl::Time restarted = absl::Now();
  servers_[1] = StartServer(1, "server-1-restarted.log");
  // RELIABILITY.md: "recovery within 10 s". Recovered means the restarted
  // shard completes steps past the checkpoint it resumed from, which
  // shows as a newer checkpoint: with --checkpoint_every_steps=5 it writes
  // one whenever a completed step is a multiple of 5.
  const std::string restarted_log = dir_ + "/server-1-restarted.log";
  ASSERT_TRUE(WaitFor(restarted_log, "resumed from", absl::Seconds(30))) << ReadFile(restarted_log);
  std::smatch resumed;
  const std::string resume_log = ReadFile(restarted_log);
  ASSERT_TRUE(std::regex_search(resume_log, resumed, std::regex(R"(resumed from \S+ \(step ([0-9]+)\))")))
      << resume_log;
  const int resumed_step = std::stoi(resumed[1]);
  EXPECT_GE(resumed_step, 10);
  absl::Duration recovery = absl::InfiniteDuration();
  while (absl::Now() - restarted < absl::Seconds(60)) {
    const std::string log = ReadFile(restarted_log);
    const std::regex ckpt("checkpoint at step ([0-9]+):");
    for (auto it = std::sregex_iterator(log.begin(), log.end(), ckpt);
         it != std::sregex_iterator(); ++it) {
      if (std::stoi((*it)[1]) > resumed_step) recovery = absl::Now() - restarted;
    }
    if (recovery != absl::InfiniteDuration()) break;
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_LE(recovery, absl::Seconds(10))
      << "the restarted shard did not complete steps past step " << resumed_step
      << " within 10 s (RELIABILITY.md: recovery within 10 s)\n"
      << ReadFile(restarted_log);
  std::cerr << "recovery: the restarted shard checkpointed past step " << resumed_step
            << " after " << recovery << "\n";
  for (auto& w : workers_) {
    std::optional<int> status = w->Wait(absl::Seconds(120));
    ASSERT_TRUE(status.has_value()) << "a worker hung after the server restart";
    EXPECT_EQ(*status, 0) << ReadFile(dir_ + "/worker-0.log") << ReadFile(dir_ + "/worker-1.log");
  }
  const std::string log = ReadFile(dir_ + "/server-1-restarted.log");
  EXPECT_TRUE(absl::StrContains(log, "resumed from")) << log;
  // Updates lost on the restarted shard: exactly the steps since its last
  // checkpoint, which it reports when it catches up with the workers (a
  // second line when a step it reopened had completed before the kill).
  // No fast-forward line means the workers had not gone past the checkpoint.
  int lost = 0;
  const std::regex ff("fast-forwarded ([0-9]+) steps");
  for (auto it = std::sregex_iterator(log.begin(), log.end(), ff); it != std::sregex_iterator();
       ++it) {
    lost += std::stoi((*it)[1]);
  }
  EXPECT_GE(lost, 0);
  EXPECT_LE(lost, 5) << "more updates lost than one checkpoint interval";
  EXPECT_TRUE(absl::StrContains(ReadFile(dir_ + "/worker-0.log"), "reconnected"));
  EXPECT_GE(TestAccuracy(0), 0.80);
}

TEST_F(FaultTest, FrozenServerResumesAfterCont) {
  extra_ = {"--max_steps=300"};
  StartCluster();
  ASSERT_TRUE(WaitFor(dir_ + "/server-1.log", "checkpoint at step 10", absl::Seconds(60)));
  servers_[1]->Signal(SIGSTOP);
  absl::SleepFor(absl::Seconds(3));
  // While it is frozen, nobody finishes and nobody gives up.
  for (auto& w : workers_) EXPECT_FALSE(w->Poll().has_value());
  servers_[1]->Signal(SIGCONT);
  for (auto& w : workers_) {
    std::optional<int> status = w->Wait(absl::Seconds(120));
    ASSERT_TRUE(status.has_value()) << "a worker hung after SIGCONT";
    EXPECT_EQ(*status, 0) << ReadFile(dir_ + "/worker-0.log");
  }
  EXPECT_GE(TestAccuracy(0), 0.75);
}

// A server frozen for longer than the workers' per-request deadline: the
// overdue requests fail with DEADLINE_EXCEEDED well before keepalive (about
// 15 s) would notice, are retried on new streams, and training finishes
// after SIGCONT.
TEST_F(FaultTest, RequestDeadlineFiresWhileServerIsFrozen) {
  extra_ = {"--max_steps=300"};
  worker_extra_ = {"--request_timeout_s=2"};
  StartCluster();
  ASSERT_TRUE(WaitFor(dir_ + "/server-1.log", "checkpoint at step 10", absl::Seconds(60)));
  servers_[1]->Signal(SIGSTOP);
  const bool noticed =
      WaitFor(dir_ + "/worker-0.log", "no reply within 2s; retrying", absl::Seconds(8));
  for (auto& w : workers_) EXPECT_FALSE(w->Poll().has_value()) << "a worker gave up";
  servers_[1]->Signal(SIGCONT);
  EXPECT_TRUE(noticed) << ReadFile(dir_ + "/worker-0.log");
  for (auto& w : workers_) {
    std::optional<int> status = w->Wait(absl::Seconds(120));
    ASSERT_TRUE(status.has_value()) << "a worker hung after SIGCONT";
    EXPECT_EQ(*status, 0) << ReadFile(dir_ + "/worker-0.log");
  }
  EXPECT_TRUE(absl::StrContains(ReadFile(dir_ + "/worker-0.log"), "reconnected"));
  EXPECT_GE(TestAccuracy(0), 0.75);
}

TEST_F(FaultTest, WorkerKilledInsideASyncStepDoesNotHangTheOther) {
  extra_ = {"--max_steps=300"};
  StartCluster();
  ASSERT_TRUE(WaitFor(dir_ + "/server-1.log", "checkpoint at step 10", absl::Seconds(60)));
  workers_[1]->Signal(SIGKILL);
  const absl::Time killed = absl::Now();
  std::optional<int> status = workers_[0]->Wait(absl::Seconds(120));
  ASSERT_TRUE(status.has_value()) << "the surviving worker hung";
  EXPECT_EQ(*status, 0) << ReadFile(dir_ + "/worker-0.log");
  EXPECT_LT(absl::Now() - killed, absl::Seconds(60));
  EXPECT_GE(TestAccuracy(0), 0.75);
}

// A synchronous worker killed and restarted (a new incarnation from the
// coordinator) rejoins at the step in progress, not at step 0, and the job
// finishes with both. (That the new incarnation's push for a step its
// predecessor had already given a gradient is not summed again is checked
// in shard_store_test, RestartedWorkerDoesNotAddASecondGradientToTheOpenStep:
// here the kill's timing decides whether that case comes up.)
TEST_F(FaultTest, SyncWorkerKilledAndRestartedRejoinsAtTheStepInProgress) {
  constexpr int kSteps = 300;
  extra_ = {absl::StrCat("--max_steps=", kSteps)};
  StartCluster();
  ASSERT_TRUE(WaitFor(dir_ + "/server-1.log", "checkpoint at step 10", absl::Seconds(60)));
  workers_[1]->Signal(SIGKILL);
  ASSERT_TRUE(workers_[1]->Wait(absl::Seconds(10)).has_value());
  workers_[1] = StartWorker(1);
  for (int r = 0; r < 2; ++r) {
    std::optional<int> status = workers_[r]->Wait(absl::Seconds(120));
    ASSERT_TRUE(status.has_value()) << "worker " << r << " hung";
    EXPECT_EQ(*status, 0) << ReadFile(absl::StrCat(dir_, "/worker-", r, ".log"));
  }
  for (int s = 0; s < 2; ++s) {
    const tessera::v1::ShardStatsResponse stats = Stats(s);
    EXPECT_EQ(stats.version(), kSteps) << "shard " << s;
    EXPECT_LE(stats.pushes_applied(), 2 * kSteps) << "shard " << s;
    // Worker 0 takes part in every step.
    EXPECT_GE(stats.pushes_applied(), kSteps) << "shard " << s;
    EXPECT_EQ(stats.requests_rejected(), 0) << "shard " << s;
  }
  // It was killed after step 10 completed: it rejoins at the step then in
  // progress (10 when it came back within the departure grace, as under
  // ASan once) or a later one the others closed meanwhile, never at 0.
  EXPECT_GE(SummaryNumber(1, "first_step"), 10) << ReadFile(dir_ + "/summary-1.json");
  EXPECT_GE(TestAccuracy(0), 0.75);
}

// A second run of a finished job against the same servers has nothing left
// to do: the worker says so instead of silently training zero steps.
TEST_F(FaultTest, RerunAgainstFinishedServersSaysThereIsNothingLeft) {
  extra_ = {"--max_steps=20"};
  StartCluster();
  for (int r = 0; r < 2; ++r) {
    std::optional<int> status = workers_[r]->Wait(absl::Seconds(120));
    ASSERT_TRUE(status.has_value()) << "worker " << r << " hung";
    ASSERT_EQ(*status, 0) << ReadFile(absl::StrCat(dir_, "/worker-", r, ".log"));
  }
  workers_[0] = StartWorker(0);
  std::optional<int> status = workers_[0]->Wait(absl::Seconds(60));
  ASSERT_TRUE(status.has_value()) << "the second run hung";
  EXPECT_EQ(*status, 0);
  const std::string log = ReadFile(dir_ + "/worker-0.log");
  EXPECT_TRUE(absl::StrContains(log, "nothing left to train: the servers already hold step 20"))
      << log;
  EXPECT_EQ(SummaryNumber(0, "steps"), 0) << ReadFile(dir_ + "/summary-0.json");
}

// With one backup worker (consistency.backup_workers) a synchronous step
// applies the first of the two gradients, so a frozen worker, still counted
// live (its connections stay open), holds nobody up: the other one finishes
// the job on its own. Every step on every shard holds exactly one gradient,
// and the frozen worker, once it runs again, finds its step closed and
// skips to the end.
TEST_F(FaultTest, FrozenWorkerDoesNotHoldUpASyncStepWithABackupWorker) {
  constexpr int kSteps = 150;
  extra_ = {absl::StrCat("--max_steps=", kSteps), "--backup_workers=1"};
  servers_.push_back(StartServer(0, "server-0.log"));
  servers_.push_back(StartServer(1, "server-1.log"));
  // Worker 1 first: one gradient closes a step, so it trains alone until
  // it is frozen in the middle of the job (not, say, still loading its
  // data while worker 0 finishes everything).
  workers_.resize(2);
  workers_[1] = StartWorker(1);
  ASSERT_TRUE(WaitFor(dir_ + "/server-1.log", "checkpoint at step 10", absl::Seconds(60)));
  workers_[0] = StartWorker(0);
  workers_[1]->Signal(SIGSTOP);
  std::optional<int> status = workers_[0]->Wait(absl::Seconds(120));
  workers_[1]->Signal(SIGCONT);
  ASSERT_TRUE(status.has_value()) << "worker 0 waited for the frozen worker";
  EXPECT_EQ(*status, 0) << ReadFile(dir_ + "/worker-0.log");
  for (int s = 0; s < 2; ++s) {
    const tessera::v1::ShardStatsResponse stats = Stats(s);
    EXPECT_EQ(stats.version(), kSteps) << "shard " << s;
    EXPECT_EQ(stats.pushes_applied(), kSteps) << "shard " << s << ": one gradient per step";
  }
  status = workers_[1]->Wait(absl::Seconds(120));
  ASSERT_TRUE(status.has_value()) << "the resumed worker hung";
  EXPECT_EQ(*status, 0) << ReadFile(dir_ + "/worker-1.log");
  EXPECT_GT(SummaryNumber(1, "skipped_steps"), 0) << ReadFile(dir_ + "/summary-1.json");
  int64_t late = 0;
  for (int s = 0; s < 2; ++s) {
    const tessera::v1::ShardStatsResponse stats = Stats(s);
    EXPECT_EQ(stats.pushes_applied(), kSteps) << "shard " << s;
    EXPECT_EQ(stats.pushes_duplicate(), 0) << "shard " << s;
    late += stats.pushes_late();
  }
  EXPECT_GE(late, 1);  // the frozen worker's push, at least on one shard
  // The workers learn which of their pushes were late, as the servers
  // counted them: none is reported as a repeat.
  EXPECT_EQ(SummaryNumber(0, "late_acks") + SummaryNumber(1, "late_acks"), late);
  EXPECT_EQ(SummaryNumber(0, "duplicate_acks") + SummaryNumber(1, "duplicate_acks"), 0);
  EXPECT_GE(TestAccuracy(0), 0.6);
}

}  // namespace
}  // namespace tessera
