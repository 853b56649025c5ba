// Writes a shard's checkpoints on a background thread, so the applying
// thread only copies numbers and never waits for the disk.

#ifndef TESSERA_SERVER_CHECKPOINTER_H_
#define TESSERA_SERVER_CHECKPOINTER_H_

#include <cstdint>
#include <optional>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/checkpoint.h"

namespace tessera {

// Outcome of one checkpoint write.
struct CheckpointResult {
  int64_t generation = 0;  // count of writes attempted so far
  int64_t step = 0;
  std::string path;
  absl::Status status;
};

// Owns the writer thread. Thread-safe.
class Checkpointer {
 public:
  Checkpointer(std::string dir, CheckpointInfo info, ModelSpec model, int keep);
  // Writes what is queued, then stops the thread.
  ~Checkpointer();

  // Queues `state` for writing; an older state still waiting is replaced,
  // since the newer one supersedes it.
  void Submit(ShardState state);

  // Writes `state` on the calling thread (the final checkpoint at shutdown)
  // after whatever is queued.
  CheckpointResult WriteNow(const ShardState& state);

  // The latest result (generation 0: nothing written yet).
  CheckpointResult last() const;

  // Waits until a write after `generation` has finished; kDeadlineExceeded
  // after `timeout`.
  absl::StatusOr<CheckpointResult> WaitAfter(int64_t generation, absl::Duration timeout);

 private:
  void Loop();
  CheckpointResult Write(const ShardState& state);

  // Constant after construction.
  const std::string dir_;
  const CheckpointInfo info_;
  const ModelSpec model_;
  const int keep_;

  // Serialises writes (background and WriteNow); never held with mu_.
  absl::Mutex write_mu_;
  mutable absl::Mutex mu_;
  std::optional<ShardState> pending_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  CheckpointResult last_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace tessera

#endif  // TESSERA_SERVER_CHECKPOINTER_H_
