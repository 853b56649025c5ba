#include "common/partition.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace tessera {

absl::StatusOr<Partition> Partition::Create(const ModelSpec& model,
                                            int num_shards,
                                            int64_t block_bytes) {
  if (num_shards < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_shards must be at least 1, got ", num_shards));
  }
  if (block_bytes < static_cast<int64_t>(sizeof(float))) {
    return absl::InvalidArgumentError(
        absl::StrCat("block_bytes must be at least 4, got ", block_bytes));
  }
  const int64_t max_elements = block_bytes / static_cast<int64_t>(sizeof(float));
  Partition p;
  p.num_shards_ = num_shards;
  int64_t flat = 0;
  for (int pi = 0; pi < static_cast<int>(model.params.size()); ++pi) {
    const int64_t n = model.params[pi].num_elements();
    const int64_t pieces = std::max<int64_t>(1, (n + max_elements - 1) / max_elements);
    // Near-equal pieces: the first n % pieces get one extra element.
    const int64_t base = n / pieces, extra = n % pieces;
    int64_t offset = 0;
    for (int64_t k = 0; k < pieces; ++k) {
      BlockInfo b;
      b.id = static_cast<uint32_t>(p.blocks_.size());
      b.param_index = pi;
      b.param_offset = offset;
      b.flat_offset = flat + offset;
      b.num_elements = base + (k < extra ? 1 : 0);
      offset += b.num_elements;
      p.blocks_.push_back(b);
    }
    flat += n;
  }
  p.total_elements_ = flat;

  std::vector<uint32_t> order(p.blocks_.size());
  std::iota(order.begin(), order.end(), 0u);
  std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
    return p.blocks_[a].num_elements > p.blocks_[b].num_elements;
  });
  std::vector<int64_t> load(num_shards, 0);
  p.shard_blocks_.assign(num_shards, {});
  for (uint32_t id : order) {
    const int shard = static_cast<int>(
        std::min_element(load.begin(), load.end()) - load.begin());
    p.blocks_[id].shard = shard;
    load[shard] += p.blocks_[id].num_elements;
    p.shard_blocks_[shard].push_back(id);
  }
  for (auto& ids : p.shard_blocks_) std::sort(ids.begin(), ids.end());
  return p;
}

int64_t Partition::shard_bytes(int shard) const {
  int64_t n = 0;
  for (uint32_t id : shard_blocks_[shard]) n += blocks_[id].num_elements;
  return n * static_cast<int64_t>(sizeof(float));
}

}  // namespace tessera
