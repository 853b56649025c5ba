#include "cli/diagram.h"

#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/job_spec.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

tessera::v1::JobSpec Job(const std::string& mode_line, int shards, int workers) {
  const std::string text = absl::StrCat(R"(
    name: "unit \"job\""
    model: "mlp:784-256-128-10"
    loss: SOFTMAX_CROSS_ENTROPY
    data { format: SYNTHETIC_REGRESSION num_samples: 100 validation_fraction: 0.2 }
    optimizer { type: SGD learning_rate: 0.1 }
    consistency { )",
                                        mode_line, R"( }
    batch_size: 4
    epochs: 1
    num_shards: )",
                                        shards, R"(
    num_workers: )",
                                        workers, R"(
    block_bytes: 65536
  )");
  absl::StatusOr<tessera::v1::JobSpec> job = ParseJobSpec(text, "unit.textproto");
  EXPECT_TRUE(job.ok()) << job.status();
  EXPECT_TRUE(ValidateJobSpec(&*job).ok());
  return *job;
}

TEST(DiagramTest, JobPictureSplitsTheModelOverTheShards) {
  absl::StatusOr<ClusterPicture> p = ClusterFromJob(Job("mode: SYNC", 3, 2), "unit.textproto");
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_EQ(p->servers.size(), 3u);
  ASSERT_EQ(p->workers.size(), 2u);
  int64_t bytes = 0;
  int64_t blocks = 0;
  for (const DiagramServer& s : p->servers) {
    ASSERT_TRUE(s.param_bytes.has_value());
    bytes += *s.param_bytes;
    blocks += *s.num_blocks;
  }
  // 784*256 + 256 + 256*128 + 128 + 128*10 + 10 floats.
  EXPECT_EQ(bytes, 235146 * 4);
  // Each tensor in ceil(bytes / 65536) blocks: 13 + 1 + 2 + 1 + 1 + 1.
  EXPECT_EQ(blocks, 19);
}

TEST(DiagramTest, FlowchartShowsShardsWorkersAndTheMode) {
  const std::string sync = MermaidFlowchart(*ClusterFromJob(Job("mode: SYNC", 2, 2), "f"));
  EXPECT_TRUE(absl::StrContains(sync, "\nflowchart LR\n")) << sync;
  EXPECT_TRUE(absl::StrContains(sync, "shard0[(\"shard 0<br/>")) << sync;
  EXPECT_TRUE(absl::StrContains(sync, "shard1 -. \"joins\" .-> coordinator")) << sync;
  EXPECT_TRUE(absl::StrContains(sync, "shard0 --- |\"hosts\"| coordinator")) << sync;
  for (const char* id : {"w0_pull", "w0_compute", "w0_push", "w1_pull"}) {
    EXPECT_TRUE(absl::StrContains(sync, id)) << id;
  }
  EXPECT_TRUE(absl::StrContains(sync, "sync barrier: step t+1 waits for all 2 workers")) << sync;
  // The job's quotes are escaped, not closing the label.
  EXPECT_TRUE(absl::StrContains(sync, "unit #34;job#34;")) << sync;

  const std::string backup =
      MermaidFlowchart(*ClusterFromJob(Job("mode: SYNC backup_workers: 1", 2, 3), "f"));
  EXPECT_TRUE(absl::StrContains(backup, "waits for the first 2 of 3 workers' step t")) << backup;

  const std::string ssp =
      MermaidFlowchart(*ClusterFromJob(Job("mode: SSP staleness: 3", 1, 1), "f"));
  EXPECT_TRUE(absl::StrContains(ssp, "ssp staleness 3")) << ssp;
  const std::string async = MermaidFlowchart(*ClusterFromJob(Job("mode: ASYNC", 1, 1), "f"));
  EXPECT_TRUE(absl::StrContains(async, "async: applied on arrival")) << async;
}

TEST(DiagramTest, ManyWorkersAreSummarised) {
  const std::string text = MermaidFlowchart(*ClusterFromJob(Job("mode: ASYNC", 2, 40), "f"));
  EXPECT_TRUE(absl::StrContains(text, "w15_pull")) << text;
  EXPECT_FALSE(absl::StrContains(text, "w16_pull")) << text;
  EXPECT_TRUE(absl::StrContains(text, "ranks 16 to 39<br/>24 more workers")) << text;
}

TEST(DiagramTest, LivePictureWithoutJobSaysTheModeIsUnknown) {
  ClusterPicture p;
  p.job_name = "j";
  p.num_shards = 2;
  p.num_workers = 3;
  p.live = true;
  p.source = "127.0.0.1:1";
  p.servers.push_back({.shard = 0,
                       .address = "127.0.0.1:1",
                       .num_blocks = 4,
                       .param_bytes = 4096,
                       .answered = true});
  p.servers.push_back(
      {.shard = 1, .address = "host:0", .num_blocks = {}, .param_bytes = {}, .answered = false});
  p.workers.push_back({.rank = 1, .step = 17, .epoch = 2, .alive = false});
  const std::string text = MermaidFlowchart(p);
  EXPECT_TRUE(absl::StrContains(text, "2 of 2 shards registered")) << text;
  EXPECT_TRUE(absl::StrContains(text, "shard 1<br/>host:0 (no answer)\")")) << text;
  EXPECT_TRUE(absl::StrContains(text, "1 of 3 registered")) << text;
  EXPECT_TRUE(absl::StrContains(text, "worker rank 1 - step 17, epoch 2 - not heard from")) << text;
  EXPECT_TRUE(absl::StrContains(text, "consistency mode unknown")) << text;
  EXPECT_TRUE(absl::StrContains(text, "class w1 gone")) << text;
  EXPECT_TRUE(absl::StrContains(text, "4.0 KiB (4096 bytes)")) << text;
}

TEST(DiagramTest, LabelTextIsEscaped) {
  EXPECT_EQ(MermaidLabelText("a\"b#c<d>e`f\ng"), "a#34;b#35;c#60;d#62;e#96;f g");
}

}  // namespace
}  // namespace tessera
