#include "server/checkpoint.h"

#include <dirent.h>
#include <unistd.h>

#include <fstream>

#include "common/job_spec.h"
#include "common/safetensors.h"
#include "common/tensor_codec.h"
#include "gtest/gtest.h"
#include "server/shard_store.h"

namespace tessera {
namespace {

using tessera::v1::JobSpec;

JobSpec AdamJob(int shards, int64_t block_bytes) {
  JobSpec job;
  job.set_name("ckpt");
  job.set_model("mlp:6-5-3");
  job.set_loss(tessera::v1::SOFTMAX_CROSS_ENTROPY);
  job.mutable_data()->set_format(tessera::v1::SYNTHETIC_REGRESSION);
  job.mutable_data()->set_num_samples(10);
  job.mutable_data()->set_validation_fraction(0.2);
  job.mutable_optimizer()->set_type(tessera::v1::ADAM);
  job.mutable_optimizer()->set_learning_rate(0.1);
  job.mutable_consistency()->set_mode(tessera::v1::ASYNC);
  job.set_batch_size(1);
  job.set_epochs(1);
  job.set_num_shards(shards);
  job.set_num_workers(1);
  job.set_block_bytes(block_bytes);
  EXPECT_TRUE(ValidateJobSpec(&job).ok());
  return job;
}

CheckpointInfo Info(const JobSpec& job, int shard) {
  CheckpointInfo info;
  info.job_name = job.name();
  info.model = job.model();
  info.optimizer_type = "ADAM";
  info.shard = shard;
  info.num_shards = job.num_shards();
  return info;
}

ModelSpec Model(const JobSpec& job) {
  return *ParseModelSpec(job.model(), LossKind::kSoftmaxCrossEntropy);
}

// Pushes `steps` deterministic gradients into every shard of a job.
std::vector<std::unique_ptr<ShardStore>> TrainedShards(const JobSpec& job, int steps) {
  std::vector<std::unique_ptr<ShardStore>> stores;
  for (int s = 0; s < job.num_shards(); ++s) {
    stores.push_back(*ShardStore::Create(job, s));
    for (int step = 0; step < steps; ++step) {
      tessera::v1::PushRequest push;
      push.set_step(step);
      for (uint32_t id : stores[s]->partition().shard_blocks(s)) {
        const BlockInfo& b = stores[s]->partition().blocks()[id];
        std::vector<float> g(b.num_elements);
        for (int64_t i = 0; i < b.num_elements; ++i) g[i] = 0.01f * ((b.flat_offset + i + step) % 7 - 3);
        auto* tb = push.add_blocks();
        tb->set_block_id(id);
        tb->set_dtype(tessera::v1::F32);
        EncodeF32(g, tb->mutable_data());
      }
      EXPECT_TRUE(stores[s]->Push(0, 1, push).ok());
    }
  }
  return stores;
}

std::string NewDir(const std::string& name) {
  std::string dir = ::testing::TempDir() + "/" + name + "-XXXXXX";
  EXPECT_NE(mkdtemp(dir.data()), nullptr);
  return dir;
}

TEST(CheckpointTest, LoadsIntoAnotherShardCountAndBlockSize) {
  const JobSpec two = AdamJob(2, 16);
  const std::string dir = NewDir("reshard");
  auto stores = TrainedShards(two, 3);
  std::vector<float> expected(Model(two).total_params());
  std::vector<std::vector<float>> expected_slots(2, std::vector<float>(expected.size()));
  for (int s = 0; s < 2; ++s) {
    ShardState state = stores[s]->Snapshot();
    EXPECT_EQ(state.step, 3);  // async: the version
    for (const BlockState& b : state.blocks) {
      std::copy(b.params.begin(), b.params.end(), expected.begin() + b.info.flat_offset);
      for (int k = 0; k < 2; ++k) {
        std::copy(b.slots[k].begin(), b.slots[k].end(), expected_slots[k].begin() + b.info.flat_offset);
      }
    }
    ASSERT_TRUE(WriteShardCheckpoint(dir, Info(two, s), Model(two), state, 3).ok());
  }
  // Three shards with other block sizes read the same numbers.
  const JobSpec three = AdamJob(3, 40);
  auto restored = LoadLatestCheckpoint(dir, Info(three, 0), Model(three), 2);
  ASSERT_TRUE(restored.ok()) << restored.status();
  ASSERT_TRUE(restored->has_value());
  EXPECT_EQ((*restored)->params, expected);
  EXPECT_EQ((*restored)->slots, expected_slots);
  for (int64_t u : (*restored)->updates) EXPECT_EQ(u, 3);
  std::vector<float> assembled(expected.size(), 0.0f);
  for (int s = 0; s < 3; ++s) {
    auto store = *ShardStore::Create(three, s);
    store->Restore(**restored);
    for (const BlockState& b : store->Snapshot().blocks) {
      std::copy(b.params.begin(), b.params.end(), assembled.begin() + b.info.flat_offset);
      EXPECT_EQ(b.updates, 3);
    }
  }
  EXPECT_EQ(assembled, expected);
}

TEST(CheckpointTest, SkipsCorruptAndIncompleteCheckpoints) {
  const JobSpec job = AdamJob(2, 16);
  const std::string dir = NewDir("fallback");
  auto stores = TrainedShards(job, 2);
  std::vector<ShardState> at2 = {stores[0]->Snapshot(), stores[1]->Snapshot()};
  for (int s = 0; s < 2; ++s) {
    ASSERT_TRUE(WriteShardCheckpoint(dir, Info(job, s), Model(job), at2[s], 5).ok());
  }
  // A newer checkpoint whose shard 1 file is corrupt...
  ShardState later0 = at2[0], later1 = at2[1];
  later0.step = later1.step = 9;
  later0.blocks[0].params[0] += 1.0f;
  ASSERT_TRUE(WriteShardCheckpoint(dir, Info(job, 0), Model(job), later0, 5).ok());
  auto path1 = WriteShardCheckpoint(dir, Info(job, 1), Model(job), later1, 5);
  ASSERT_TRUE(path1.ok());
  {
    std::fstream f(*path1, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-3, std::ios::end);
    f.put('\x7f');
  }
  // ...and a newest one with shard 1's file missing altogether.
  later0.step = 12;
  ASSERT_TRUE(WriteShardCheckpoint(dir, Info(job, 0), Model(job), later0, 5).ok());

  std::vector<std::string> skipped;
  auto restored = LoadLatestCheckpoint(dir, Info(job, 0), Model(job), 2, &skipped);
  ASSERT_TRUE(restored.ok()) << restored.status();
  ASSERT_TRUE(restored->has_value());
  EXPECT_EQ((*restored)->step, 2);
  ASSERT_EQ(skipped.size(), 2u);
  EXPECT_NE(skipped[0].find("step-0000000012"), std::string::npos) << skipped[0];
  EXPECT_NE(skipped[1].find("checksum"), std::string::npos) << skipped[1];
  EXPECT_EQ((*restored)->params[at2[0].blocks[0].info.flat_offset], at2[0].blocks[0].params[0]);

  // A server restoring its own shard reads its own newest file: shard 0's
  // step-12 file although shard 1 wrote none there; shard 1 skips its
  // missing and its corrupt file and falls back to step 2.
  auto own0 = LoadShardCheckpoint(dir, Info(job, 0), Model(job), 2);
  ASSERT_TRUE(own0.ok() && own0->has_value()) << own0.status();
  EXPECT_EQ((*own0)->step, 12);
  EXPECT_TRUE((*own0)->own_file_only);
  EXPECT_EQ((*own0)->params[at2[0].blocks[0].info.flat_offset], later0.blocks[0].params[0]);
  std::vector<std::string> skipped1;
  auto own1 = LoadShardCheckpoint(dir, Info(job, 1), Model(job), 2, &skipped1);
  ASSERT_TRUE(own1.ok() && own1->has_value()) << own1.status();
  EXPECT_EQ((*own1)->step, 2);
  EXPECT_EQ(skipped1.size(), 2u);
  // A restored shard 0 holds exactly its step-12 numbers.
  auto store = *ShardStore::Create(job, 0);
  store->Restore(**own0);
  const ShardState s0 = store->Snapshot();
  ASSERT_EQ(s0.blocks.size(), later0.blocks.size());
  for (size_t b = 0; b < s0.blocks.size(); ++b) {
    EXPECT_EQ(s0.blocks[b].params, later0.blocks[b].params) << "block " << b;
  }
  // Another shard count needs every file of a step: step 2 again.
  const JobSpec three = AdamJob(3, 16);
  auto resharded = LoadShardCheckpoint(dir, Info(three, 0), Model(three), 2);
  ASSERT_TRUE(resharded.ok() && resharded->has_value()) << resharded.status();
  EXPECT_EQ((*resharded)->step, 2);
  EXPECT_FALSE((*resharded)->own_file_only);
}

TEST(CheckpointTest, RefusesAnotherModelOrOptimizer) {
  const JobSpec job = AdamJob(1, 1024);
  const std::string dir = NewDir("mismatch");
  auto stores = TrainedShards(job, 1);
  ASSERT_TRUE(WriteShardCheckpoint(dir, Info(job, 0), Model(job), stores[0]->Snapshot(), 3).ok());
  CheckpointInfo other = Info(job, 0);
  other.optimizer_type = "SGD";
  auto r = LoadLatestCheckpoint(dir, other, Model(job), 0);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("ADAM"), std::string::npos) << r.status();
  other = Info(job, 0);
  other.model = "mlp:6-4-3";
  EXPECT_EQ(LoadLatestCheckpoint(dir, other, *ParseModelSpec("mlp:6-4-3", LossKind::kSoftmaxCrossEntropy), 2)
                .status()
                .code(),
            absl::StatusCode::kFailedPrecondition);
  // An empty folder holds no checkpoint: that is not an error.
  auto none = LoadLatestCheckpoint(NewDir("empty"), Info(job, 0), Model(job), 2);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
}

// The data section's CRC does not cover the header: a damaged per-tensor
// update count (Adam's bias correction depends on it) must still be caught.
TEST(CheckpointTest, SkipsACheckpointWithABadUpdateCount) {
  const JobSpec job = AdamJob(1, 1024);
  const std::string dir = NewDir("updates");
  auto stores = TrainedShards(job, 2);
  ShardState state = stores[0]->Snapshot();
  ASSERT_TRUE(WriteShardCheckpoint(dir, Info(job, 0), Model(job), state, 5).ok());
  state.step = 7;
  auto path = WriteShardCheckpoint(dir, Info(job, 0), Model(job), state, 5);
  ASSERT_TRUE(path.ok()) << path.status();
  for (const char* bad : {"", "x2", "-1"}) {
    SCOPED_TRACE(std::string("updates = '") + bad + "'");
    auto file = ReadSafetensorsFile(*path);
    ASSERT_TRUE(file.ok()) << file.status();
    int rewritten = 0;
    for (auto& [key, value] : file->metadata) {
      if (key.rfind("updates/", 0) == 0) {
        value = bad;
        ++rewritten;
      }
    }
    ASSERT_GT(rewritten, 0) << "no updates/ metadata in " << *path;
    file->metadata.erase("crc32");  // recomputed by the write
    std::vector<TensorToWrite> tensors;
    for (const auto& [name, t] : file->tensors) tensors.push_back({name, t.shape, t.data});
    ASSERT_TRUE(WriteSafetensorsFile(*path, tensors, file->metadata).ok());

    std::vector<std::string> skipped;
    auto restored = LoadLatestCheckpoint(dir, Info(job, 0), Model(job), 0, &skipped);
    ASSERT_TRUE(restored.ok() && restored->has_value()) << restored.status();
    EXPECT_EQ((*restored)->step, 2);  // the older, intact checkpoint
    ASSERT_EQ(skipped.size(), 1u);
    EXPECT_NE(skipped[0].find("update count"), std::string::npos) << skipped[0];
  }
}

TEST(CheckpointTest, RetentionKeepsTheNewest) {
  const JobSpec job = AdamJob(1, 1024);
  const std::string dir = NewDir("retention");
  auto stores = TrainedShards(job, 1);
  ShardState state = stores[0]->Snapshot();
  for (int64_t step : {10, 20, 30, 40, 50}) {
    state.step = step;
    ASSERT_TRUE(WriteShardCheckpoint(dir, Info(job, 0), Model(job), state, 2).ok());
  }
  std::vector<std::string> names;
  DIR* d = opendir(dir.c_str());
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] != '.') names.push_back(e->d_name);
  }
  closedir(d);
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"step-0000000040", "step-0000000050"}));
}

}  // namespace
}  // namespace tessera
