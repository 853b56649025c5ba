#include "common/partition.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_spec.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

constexpr int64_t kBlockBytes = 262144;

ModelSpec FashionMlp() {
  absl::StatusOr<ModelSpec> model =
      ParseModelSpec("mlp:784-256-128-10", LossKind::kSoftmaxCrossEntropy);
  EXPECT_TRUE(model.ok()) << model.status();
  return *model;
}

// Checks the invariants every partition must satisfy, whatever its inputs.
void CheckInvariants(const ModelSpec& model, const Partition& p,
                     int64_t block_bytes) {
  const std::vector<int64_t> offsets = model.param_offsets();
  const std::vector<BlockInfo>& blocks = p.blocks();
  ASSERT_FALSE(blocks.empty());
  EXPECT_EQ(p.total_elements(), model.total_params());

  // Blocks tile every parameter in order, with no gaps or overlaps.
  std::vector<int> covered(model.total_params(), 0);
  int expected_param = 0;
  int64_t expected_offset = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const BlockInfo& b = blocks[i];
    EXPECT_EQ(b.id, i);
    if (b.param_index != expected_param) {
      // The previous parameter must be complete before the next starts.
      EXPECT_EQ(expected_offset,
                model.params[expected_param].num_elements())
          << "block " << i;
      EXPECT_EQ(b.param_index, expected_param + 1) << "block " << i;
      expected_param = b.param_index;
      expected_offset = 0;
    }
    ASSERT_GE(b.param_index, 0);
    ASSERT_LT(b.param_index, static_cast<int>(model.params.size()));
    EXPECT_EQ(b.param_offset, expected_offset) << "block " << i;
    EXPECT_EQ(b.flat_offset, offsets[b.param_index] + b.param_offset)
        << "block " << i;
    EXPECT_GT(b.num_elements, 0) << "block " << i;
    EXPECT_LE(b.num_elements * static_cast<int64_t>(sizeof(float)),
              block_bytes)
        << "block " << i;
    EXPECT_GE(b.shard, 0);
    EXPECT_LT(b.shard, p.num_shards());
    for (int64_t e = 0; e < b.num_elements; ++e) {
      const int64_t flat = b.flat_offset + e;
      ASSERT_GE(flat, 0);
      ASSERT_LT(flat, model.total_params());
      ++covered[flat];
    }
    expected_offset += b.num_elements;
  }
  EXPECT_EQ(expected_param, static_cast<int>(model.params.size()) - 1);
  EXPECT_EQ(expected_offset, model.params.back().num_elements());
  for (int64_t e = 0; e < model.total_params(); ++e) {
    ASSERT_EQ(covered[e], 1) << "flat element " << e;
  }

  // shard_blocks lists exactly the blocks whose shard field names it.
  std::vector<int> owners(blocks.size(), 0);
  int64_t total_bytes = 0;
  for (int s = 0; s < p.num_shards(); ++s) {
    const std::vector<uint32_t>& ids = p.shard_blocks(s);
    EXPECT_TRUE(std::is_sorted(ids.begin(), ids.end())) << "shard " << s;
    EXPECT_TRUE(std::adjacent_find(ids.begin(), ids.end()) == ids.end())
        << "shard " << s;
    int64_t bytes = 0;
    for (uint32_t id : ids) {
      ASSERT_LT(id, blocks.size());
      EXPECT_EQ(blocks[id].shard, s) << "block " << id;
      ++owners[id];
      bytes += blocks[id].num_elements * static_cast<int64_t>(sizeof(float));
    }
    EXPECT_EQ(p.shard_bytes(s), bytes) << "shard " << s;
    total_bytes += bytes;
  }
  for (size_t i = 0; i < blocks.size(); ++i) {
    EXPECT_EQ(owners[i], 1) << "block " << i;
  }
  EXPECT_EQ(total_bytes,
            model.total_params() * static_cast<int64_t>(sizeof(float)));
}

TEST(PartitionTest, FashionMlpTwoShardsCoversEveryElementOnce) {
  const ModelSpec model = FashionMlp();
  absl::StatusOr<Partition> p = Partition::Create(model, 2, kBlockBytes);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->num_shards(), 2);
  CheckInvariants(model, *p, kBlockBytes);
}

TEST(PartitionTest, FashionMlpTwoShardsBlockLayout) {
  const ModelSpec model = FashionMlp();
  absl::StatusOr<Partition> p = Partition::Create(model, 2, kBlockBytes);
  ASSERT_TRUE(p.ok()) << p.status();
  // 65536 elements per block at most: fc0.weight (200704) needs 4 pieces of
  // 50176; every other tensor fits in one.
  const std::vector<BlockInfo>& blocks = p->blocks();
  ASSERT_EQ(blocks.size(), 9u);
  const std::vector<int> param_index = {0, 0, 0, 0, 1, 2, 3, 4, 5};
  const std::vector<int64_t> num_elements = {50176, 50176, 50176, 50176, 256,
                                             32768, 128,   1280,  10};
  const std::vector<int64_t> flat_offsets = {0,      50176,  100352,
                                             150528, 200704, 200960,
                                             233728, 233856, 235136};
  for (size_t i = 0; i < blocks.size(); ++i) {
    EXPECT_EQ(blocks[i].param_index, param_index[i]) << "block " << i;
    EXPECT_EQ(blocks[i].num_elements, num_elements[i]) << "block " << i;
    EXPECT_EQ(blocks[i].flat_offset, flat_offsets[i]) << "block " << i;
  }
  // Largest first, to the least-loaded shard: 0,1,2,3 alternate; then 5 goes
  // to shard 0 and the rest (7, 4, 6, 8) to the lighter shard 1.
  EXPECT_EQ(p->shard_blocks(0), (std::vector<uint32_t>{0, 2, 5}));
  EXPECT_EQ(p->shard_blocks(1), (std::vector<uint32_t>{1, 3, 4, 6, 7, 8}));
  EXPECT_EQ(p->shard_bytes(0), 133120 * 4);
  EXPECT_EQ(p->shard_bytes(1), 102026 * 4);
}

TEST(PartitionTest, ShardLoadsWithinOneBlockOfEachOther) {
  const ModelSpec model = FashionMlp();
  for (int shards : {2, 3, 4, 5}) {
    for (int64_t block_bytes : {int64_t{4096}, int64_t{65536}, kBlockBytes}) {
      absl::StatusOr<Partition> p =
          Partition::Create(model, shards, block_bytes);
      ASSERT_TRUE(p.ok()) << p.status();
      CheckInvariants(model, *p, block_bytes);
      int64_t largest_block = 0;
      for (const BlockInfo& b : p->blocks()) {
        largest_block = std::max<int64_t>(
            largest_block, b.num_elements * static_cast<int64_t>(sizeof(float)));
      }
      int64_t lo = p->shard_bytes(0), hi = p->shard_bytes(0);
      for (int s = 1; s < shards; ++s) {
        lo = std::min(lo, p->shard_bytes(s));
        hi = std::max(hi, p->shard_bytes(s));
      }
      EXPECT_LE(hi - lo, largest_block)
          << shards << " shards, " << block_bytes << " block bytes";
      EXPECT_LE(largest_block, block_bytes);
    }
  }
}

TEST(PartitionTest, IsDeterministic) {
  const ModelSpec model = FashionMlp();
  absl::StatusOr<Partition> a = Partition::Create(model, 3, 16384);
  absl::StatusOr<Partition> b = Partition::Create(model, 3, 16384);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(a->blocks().size(), b->blocks().size());
  for (size_t i = 0; i < a->blocks().size(); ++i) {
    const BlockInfo& x = a->blocks()[i];
    const BlockInfo& y = b->blocks()[i];
    EXPECT_EQ(x.id, y.id);
    EXPECT_EQ(x.param_index, y.param_index);
    EXPECT_EQ(x.param_offset, y.param_offset);
    EXPECT_EQ(x.flat_offset, y.flat_offset);
    EXPECT_EQ(x.num_elements, y.num_elements);
    EXPECT_EQ(x.shard, y.shard) << "block " << i;
  }
  for (int s = 0; s < 3; ++s) {
    EXPECT_EQ(a->shard_blocks(s), b->shard_blocks(s));
    EXPECT_EQ(a->shard_bytes(s), b->shard_bytes(s));
  }
}

TEST(PartitionTest, OneShardOwnsEverything) {
  const ModelSpec model = FashionMlp();
  absl::StatusOr<Partition> p = Partition::Create(model, 1, kBlockBytes);
  ASSERT_TRUE(p.ok()) << p.status();
  CheckInvariants(model, *p, kBlockBytes);
  EXPECT_EQ(p->shard_blocks(0).size(), p->blocks().size());
  EXPECT_EQ(p->shard_bytes(0), model.total_params() * 4);
  for (const BlockInfo& b : p->blocks()) EXPECT_EQ(b.shard, 0);
}

TEST(PartitionTest, MoreShardsThanBlocksLeavesSomeEmpty) {
  absl::StatusOr<ModelSpec> model =
      ParseModelSpec("linear:10-1", LossKind::kMeanSquaredError);
  ASSERT_TRUE(model.ok()) << model.status();
  absl::StatusOr<Partition> p = Partition::Create(*model, 5, kBlockBytes);
  ASSERT_TRUE(p.ok()) << p.status();
  CheckInvariants(*model, *p, kBlockBytes);
  ASSERT_EQ(p->blocks().size(), 2u);  // weight and bias
  // The 10-element weight goes to shard 0, the bias to shard 1.
  EXPECT_EQ(p->shard_blocks(0), (std::vector<uint32_t>{0}));
  EXPECT_EQ(p->shard_blocks(1), (std::vector<uint32_t>{1}));
  for (int s = 2; s < 5; ++s) {
    EXPECT_TRUE(p->shard_blocks(s).empty()) << "shard " << s;
    EXPECT_EQ(p->shard_bytes(s), 0) << "shard " << s;
  }

  const ModelSpec mlp = FashionMlp();
  absl::StatusOr<Partition> wide = Partition::Create(mlp, 16, kBlockBytes);
  ASSERT_TRUE(wide.ok()) << wide.status();
  CheckInvariants(mlp, *wide, kBlockBytes);
  int empty = 0;
  for (int s = 0; s < 16; ++s) empty += wide->shard_blocks(s).empty() ? 1 : 0;
  EXPECT_EQ(empty, 16 - 9);
}

TEST(PartitionTest, SmallBlocksSplitTensorsNearEqually) {
  const ModelSpec model = FashionMlp();
  // 40 bytes = 10 elements: fc1.bias (128 elements) becomes 13 pieces;
  // 128 = 13 * 9 + 11, so the first 11 hold 10 elements and the last 2 hold 9.
  absl::StatusOr<Partition> p = Partition::Create(model, 2, 40);
  ASSERT_TRUE(p.ok()) << p.status();
  CheckInvariants(model, *p, 40);
  std::vector<int64_t> fc1_bias;
  for (const BlockInfo& b : p->blocks()) {
    if (b.param_index == 3) fc1_bias.push_back(b.num_elements);
  }
  std::vector<int64_t> expected(11, 10);
  expected.push_back(9);
  expected.push_back(9);
  EXPECT_EQ(fc1_bias, expected);
}

TEST(PartitionTest, RejectsBadArguments) {
  const ModelSpec model = FashionMlp();
  absl::StatusOr<Partition> no_shards = Partition::Create(model, 0, kBlockBytes);
  EXPECT_EQ(no_shards.status().code(), absl::StatusCode::kInvalidArgument);
  absl::StatusOr<Partition> negative = Partition::Create(model, -1, kBlockBytes);
  EXPECT_EQ(negative.status().code(), absl::StatusCode::kInvalidArgument);
  absl::StatusOr<Partition> tiny = Partition::Create(model, 2, 2);
  EXPECT_EQ(tiny.status().code(), absl::StatusCode::kInvalidArgument);
  // Four bytes, one float per block, is the smallest block accepted.
  absl::StatusOr<ModelSpec> small =
      ParseModelSpec("linear:3-2", LossKind::kMeanSquaredError);
  ASSERT_TRUE(small.ok());
  absl::StatusOr<Partition> one_float = Partition::Create(*small, 2, 4);
  ASSERT_TRUE(one_float.ok()) << one_float.status();
  EXPECT_EQ(one_float->blocks().size(), 8u);
  CheckInvariants(*small, *one_float, 4);
}

}  // namespace
}  // namespace tessera
