// The deterministic, byte-balanced assignment of parameter blocks to shards.

#ifndef TESSERA_COMMON_PARTITION_H_
#define TESSERA_COMMON_PARTITION_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_spec.h"

namespace tessera {

// One contiguous piece of one parameter tensor.
struct BlockInfo {
  uint32_t id = 0;           // dense, in parameter order then offset order
  int param_index = 0;       // index into ModelSpec::params
  int64_t param_offset = 0;  // first element within the parameter
  int64_t flat_offset = 0;   // first element within the concatenated buffer
  int64_t num_elements = 0;
  int shard = 0;
};

// Every process computes the same Partition from (model, num_shards,
// block_bytes): each tensor is cut into ceil(bytes / block_bytes) pieces of
// near-equal size, then pieces are dealt largest first (ties by id) to the
// shard holding the fewest bytes so far (ties by lowest index).
// Immutable after construction; thread-safe.
class Partition {
 public:
  // kInvalidArgument when num_shards < 1 or block_bytes < 4.
  static absl::StatusOr<Partition> Create(const ModelSpec& model,
                                          int num_shards, int64_t block_bytes);

  int num_shards() const { return num_shards_; }
  const std::vector<BlockInfo>& blocks() const { return blocks_; }
  // Ids of the blocks owned by `shard`, ascending.
  const std::vector<uint32_t>& shard_blocks(int shard) const {
    return shard_blocks_[shard];
  }
  // Bytes of parameters owned by `shard`.
  int64_t shard_bytes(int shard) const;
  int64_t total_elements() const { return total_elements_; }

 private:
  int num_shards_ = 0;
  int64_t total_elements_ = 0;
  std::vector<BlockInfo> blocks_;
  std::vector<std::vector<uint32_t>> shard_blocks_;
};

}  // namespace tessera

#endif  // TESSERA_COMMON_PARTITION_H_
