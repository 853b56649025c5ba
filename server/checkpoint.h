// Shard checkpoints on disk, in the safetensors format.
//
// Layout: <dir>/step-NNNNNNNNNN/shard-S-of-N.safetensors, one file per shard.
// A checkpoint is complete when every shard's file of its step is present
// and its checksum verifies; only complete checkpoints are loaded. Tensors
// are named "<param>@<offset>" (a block of a parameter, 1-D) and
// "<param>@<offset>/slot<k>" (its optimizer slots), so a checkpoint can be
// loaded into any shard count or block size, and read by other tools.

#ifndef TESSERA_SERVER_CHECKPOINT_H_
#define TESSERA_SERVER_CHECKPOINT_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_spec.h"
#include "common/partition.h"

namespace tessera {

// The state of one block, copied out of the store.
struct BlockState {
  BlockInfo info;
  std::vector<float> params;
  std::vector<std::vector<float>> slots;
  int64_t updates = 0;
};

// A shard's state at one step.
struct ShardState {
  int64_t step = 0;     // SYNC: completed steps
  int64_t version = 0;  // updates applied
  std::vector<BlockState> blocks;
};

// What the checkpoint file records besides the numbers.
struct CheckpointInfo {
  std::string job_name;
  std::string model;           // job.model, checked on load
  std::string optimizer_type;  // OptimizerType name, checked on load
  int shard = 0;
  int num_shards = 1;
};

// Writes `state` durably and returns the file's path; then deletes this
// shard's files of all but the newest `keep` step folders (never the one
// just written, and only after it was read back and verified).
absl::StatusOr<std::string> WriteShardCheckpoint(const std::string& dir,
                                                 const CheckpointInfo& info,
                                                 const ModelSpec& model,
                                                 const ShardState& state, int keep);

// Every parameter element of a model as a complete checkpoint holds it,
// independent of the shard count that wrote it.
struct RestoredModel {
  int64_t step = 0;
  int64_t version = 0;
  std::string path;  // the step folder
  // Flat model layout (ModelSpec::params concatenated).
  std::vector<float> params;
  std::vector<std::vector<float>> slots;
  // Per element: updates of the block that held it (Adam's bias
  // correction needs the count).
  std::vector<int64_t> updates;
  // True when only this shard's own file was read (LoadShardCheckpoint):
  // the other shards' elements are zero.
  bool own_file_only = false;
};

// Deletes this shard's temporary files (`*.safetensors.tmp`) left in `dir`
// by a write that was cut short; returns how many it removed.
int RemoveStaleTemporaries(const std::string& dir, int shard);

// Loads the newest complete checkpoint in `dir`, skipping incomplete or
// corrupt ones (each skipped folder is reported in `skipped`, if given).
// nullopt when there is none. kFailedPrecondition when the newest complete
// one holds another model or optimizer.
absl::StatusOr<std::optional<RestoredModel>> LoadLatestCheckpoint(
    const std::string& dir, const CheckpointInfo& expected, const ModelSpec& model,
    int num_slots, std::vector<std::string>* skipped = nullptr);

// What a server restores at start-up: the newest step folder holding this
// shard's own file at the same shard count (read alone, so a server
// restarted on its own resumes from the final checkpoint it wrote on
// SIGTERM even though the other shards, which kept running, wrote none at
// that step), or else, for a changed shard count, the newest complete one.
// Skips corrupt files and incomplete folders like LoadLatestCheckpoint.
absl::StatusOr<std::optional<RestoredModel>> LoadShardCheckpoint(
    const std::string& dir, const CheckpointInfo& expected, const ModelSpec& model,
    int num_slots, std::vector<std::string>* skipped = nullptr);

}  // namespace tessera

#endif  // TESSERA_SERVER_CHECKPOINT_H_
