#include "cli/status.h"

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

std::string LineStartingWith(const std::string& text, const std::string& prefix) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (absl::StartsWith(line, prefix)) return std::string(line);
  }
  return "";
}

TEST(StatusTest, RendersShardsWorkersLagAndCheckpoints) {
  StatusView view;
  view.coordinator = "10.0.0.1:7070";
  view.job.set_job_name("demo");
  view.job.set_num_shards(2);
  view.job.set_num_workers(2);
  auto* s0 = view.job.add_servers();
  s0->set_shard(0);
  s0->set_address("10.0.0.1:7070");
  auto* w0 = view.job.add_workers();
  w0->set_worker_id(0);
  w0->set_step(10);
  w0->set_epoch(1);
  w0->set_loss(0.25);
  w0->set_alive(true);
  auto* w1 = view.job.add_workers();
  w1->set_worker_id(1);
  w1->set_step(7);
  w1->set_alive(false);
  view.shards.resize(2);
  view.shard_addresses = {"10.0.0.1:7070", ""};
  tessera::v1::ShardStatsResponse stats;
  stats.set_shard(0);
  stats.set_version(10);
  stats.set_num_blocks(3);
  stats.set_param_bytes(3 * 1048576);
  stats.set_live_workers(2);
  stats.set_pushes_applied(20);
  stats.set_pushes_late(4);
  stats.set_requests_rejected(1);
  stats.set_last_checkpoint_step(8);
  view.shards[0] = stats;

  const std::string text = RenderStatus(view);
  EXPECT_TRUE(absl::StrContains(text, "job 'demo' at 10.0.0.1:7070: step 10, epoch 2; 1/2 servers, "
                                      "1/2 workers alive"))
      << text;
  const std::string shard0 = LineStartingWith(text, "0      10.0.0.1:7070");
  EXPECT_TRUE(absl::StrContains(shard0, "3.00")) << shard0;
  EXPECT_TRUE(absl::StrContains(shard0, "step 8")) << shard0;
  // Applied, late and rejected pushes, in the columns the header names.
  EXPECT_TRUE(absl::StrContains(text, "pushes    late    rejected  last checkpoint")) << text;
  EXPECT_TRUE(absl::StrContains(shard0, "20        4       1         step 8")) << shard0;
  EXPECT_TRUE(absl::StrContains(LineStartingWith(text, "1      "), "(not registered)")) << text;
  EXPECT_TRUE(absl::StrContains(LineStartingWith(text, "1      "), "(no answer)")) << text;
  // Worker 1 trails worker 0 by three steps and is not alive.
  const std::string worker1 = LineStartingWith(text, "1       no");
  EXPECT_FALSE(worker1.empty()) << text;
  EXPECT_TRUE(absl::StrContains(worker1, " 3 ")) << worker1;
}

}  // namespace
}  // namespace tessera
