// `tessera diagram` through the real binaries: its Mermaid text, drawn from
// a job file and from a live server, is accepted by Mermaid's own parser
// (npm package `mermaid`, run offline by tests/mermaid_parse.mjs).

#include <grpcpp/grpcpp.h>
#include <sys/stat.h>

#include <chrono>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/job_spec.h"
#include "gtest/gtest.h"
#include "proto/tessera.grpc.pb.h"
#include "tests/cluster_util.h"

namespace tessera {
namespace {

using testing_util::Bin;
using testing_util::NewTempDir;
using testing_util::RunProgram;
using testing_util::RunResult;
using testing_util::ServerProcess;
using testing_util::SourceDir;
using testing_util::WriteFile;

std::string FashionJob() { return SourceDir() + "/examples/fashion_mnist_mlp.textproto"; }

bool Exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

class DiagramTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (system("command -v node >/dev/null 2>&1") != 0) {
      GTEST_SKIP() << "node is not installed: Mermaid's parser cannot run";
    }
    ASSERT_TRUE(Exists(SourceDir() + "/node_modules/mermaid/package.json") &&
                Exists(SourceDir() + "/node_modules/jsdom/package.json"))
        << "node_modules/mermaid or node_modules/jsdom is missing: run `npm ci` in " << SourceDir()
        << " (`make test` does it before running the tests)";
    dir_ = NewTempDir("diagram");
  }

  // Runs Mermaid's parser on `text`; the parser's output on failure.
  RunResult Parse(const std::string& text) {
    const std::string file = absl::StrCat(dir_, "/diagram-", files_++, ".mmd");
    WriteFile(file, text);
    return RunProgram(
        {"/bin/sh", "-c",
         absl::StrCat("exec node '", SourceDir(), "/tests/mermaid_parse.mjs' < '", file, "'")},
        dir_, absl::Minutes(1));
  }

  RunResult Diagram(std::vector<std::string> args) {
    args.insert(args.begin(), {Bin("tessera"), "diagram"});
    return RunProgram(args, dir_, absl::Seconds(30));
  }

  std::string dir_;
  int files_ = 0;
};

TEST_F(DiagramTest, ParserRejectsBrokenText) {
  // Otherwise the checks below could not fail.
  RunResult r = Parse("flowchart LR\n  a[\"open label --> b\n");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(absl::StrContains(r.output, "Parse error")) << r.output;
}

TEST_F(DiagramTest, JobFileDiagramParses) {
  RunResult d = Diagram({"--job=" + FashionJob()});
  ASSERT_EQ(d.status, 0) << d.output;
  // Both shards with what they own (784-256-128-10: 235146 floats in all),
  // the coordinator, and both workers' loops with the sync barrier.
  EXPECT_TRUE(absl::StrContains(d.output, "parameter servers: 2 shards, 918.5 KiB (940584 bytes)"))
      << d.output;
  EXPECT_TRUE(absl::StrContains(d.output, "shard0[(\"shard 0<br/>")) << d.output;
  EXPECT_TRUE(absl::StrContains(d.output, "shard1[(\"shard 1<br/>")) << d.output;
  EXPECT_TRUE(absl::StrContains(d.output, "coordinator{{")) << d.output;
  EXPECT_TRUE(absl::StrContains(d.output, "w1_push -- \"sync barrier")) << d.output;
  RunResult p = Parse(d.output);
  EXPECT_EQ(p.status, 0) << p.output << "\n" << d.output;
  EXPECT_TRUE(absl::StrContains(p.output, "mermaid: ok (flowchart")) << p.output;

  RunResult ssp = Diagram({"--job=" + FashionJob(), "--mode=ssp", "--staleness=3",
                           "--num_workers=20", "--num_shards=5"});
  ASSERT_EQ(ssp.status, 0) << ssp.output;
  EXPECT_TRUE(absl::StrContains(ssp.output, "ssp staleness 3")) << ssp.output;
  EXPECT_TRUE(absl::StrContains(ssp.output, "shard4[(")) << ssp.output;
  EXPECT_TRUE(absl::StrContains(ssp.output, "4 more workers")) << ssp.output;
  p = Parse(ssp.output);
  EXPECT_EQ(p.status, 0) << p.output << "\n" << ssp.output;
}

TEST_F(DiagramTest, LiveServerDiagramParses) {
  const std::vector<std::string> one_shard = {"--job=" + FashionJob(), "--num_shards=1"};
  std::unique_ptr<ServerProcess> server =
      ServerProcess::Start(dir_, {"--job=" + FashionJob(), "--shard=0", "--num_shards=1"});
  ASSERT_NE(server, nullptr);

  // A worker that registered and reported step 17, as tessera-worker does.
  JobOverrides overrides;
  overrides.num_shards = 1;
  absl::StatusOr<v1::JobSpec> job = LoadJob(FashionJob(), overrides);
  ASSERT_TRUE(job.ok()) << job.status();
  auto stub = v1::CoordinatorService::NewStub(
      grpc::CreateChannel(server->address(), grpc::InsecureChannelCredentials()));
  v1::RegisterRequest reg;
  reg.set_worker_id(1);
  reg.set_job_hash(JobHash(*job));
  v1::RegisterResponse reg_reply;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::Status s = stub->Register(&ctx, reg, &reg_reply);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  v1::HeartbeatRequest beat;
  beat.set_worker_id(1);
  beat.set_incarnation(reg_reply.incarnation());
  beat.set_step(17);
  beat.set_epoch(0);
  beat.set_loss(0.5);
  v1::HeartbeatResponse beat_reply;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::Status s = stub->Heartbeat(&ctx, beat, &beat_reply);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }

  std::vector<std::string> args = one_shard;
  args.insert(args.begin(), server->address());
  RunResult with_job = Diagram(args);
  ASSERT_EQ(with_job.status, 0) << with_job.output;
  // The shard's own figures (ShardStats), the worker's reported step, and
  // the mode from the job file.
  EXPECT_TRUE(absl::StrContains(with_job.output, "1 of 1 shard registered")) << with_job.output;
  EXPECT_TRUE(absl::StrContains(with_job.output, "918.5 KiB (940584 bytes)")) << with_job.output;
  EXPECT_TRUE(absl::StrContains(with_job.output, server->address())) << with_job.output;
  EXPECT_TRUE(absl::StrContains(with_job.output, "worker rank 1 - step 17")) << with_job.output;
  EXPECT_TRUE(absl::StrContains(with_job.output, "1 of 2 registered, sync")) << with_job.output;
  RunResult p = Parse(with_job.output);
  EXPECT_EQ(p.status, 0) << p.output << "\n" << with_job.output;

  RunResult bare = Diagram({server->address()});
  ASSERT_EQ(bare.status, 0) << bare.output;
  EXPECT_TRUE(absl::StrContains(bare.output, "consistency mode unknown")) << bare.output;
  EXPECT_TRUE(absl::StrContains(bare.output, "918.5 KiB (940584 bytes)")) << bare.output;
  p = Parse(bare.output);
  EXPECT_EQ(p.status, 0) << p.output << "\n" << bare.output;

  // A job file that is not the running one is refused, by name.
  RunResult other = Diagram({server->address(), "--job=" + FashionJob()});
  EXPECT_EQ(other.status, 1) << other.output;
  EXPECT_TRUE(absl::StrContains(other.output, "--job: the job file hashes to")) << other.output;
}

TEST_F(DiagramTest, UsageAndUnreachableCoordinatorFailWithOneLine) {
  RunResult none = Diagram({});
  EXPECT_EQ(none.status, 1) << none.output;
  EXPECT_TRUE(absl::StrContains(none.output, "usage: tessera diagram")) << none.output;
  // Port 1 on loopback: nothing listens there.
  RunResult unreachable = Diagram({"127.0.0.1:1"});
  EXPECT_EQ(unreachable.status, 1) << unreachable.output;
  EXPECT_TRUE(absl::StrContains(unreachable.output, "job status from 127.0.0.1:1"))
      << unreachable.output;
}

}  // namespace
}  // namespace tessera
