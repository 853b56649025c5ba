// The parameter store of one shard: parameters, optimizer slots and the
// aggregation buffers of the step in progress, with the consistency policy
// (SYNC, ASYNC, SSP) and exactly-once apply. Transport-free: the gRPC
// adapter in parameter_service.cc turns protos on a stream into calls here.

#ifndef TESSERA_SERVER_SHARD_STORE_H_
#define TESSERA_SERVER_SHARD_STORE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/aligned_buffer.h"
#include "common/model_spec.h"
#include "common/partition.h"
#include "proto/tessera.pb.h"
#include "server/apply_pool.h"
#include "server/checkpoint.h"
#include "server/optimizer.h"

namespace tessera {

// Outcome of an accepted push.
struct PushOutcome {
  bool applied = false;  // false: acknowledged without effect
  std::string detail;    // why not applied
  // Updates applied since the parameters the gradient was computed from
  // (the push's base_version); 0 in sync mode.
  int64_t staleness = 0;
  // SYNC: steps this push skipped the shard ahead by (a restarted shard
  // catching up with its workers; those updates are lost on this shard).
  int64_t fast_forwarded = 0;
  // Not applied because its step closed without it (SYNC: backup workers,
  // or a worker rejoining after the others went on).
  bool late = false;
};

// Counters, for ShardStats and tests.
struct StoreStats {
  int64_t version = 0;
  int64_t pushes_applied = 0;
  int64_t pushes_duplicate = 0;  // repeats of a push already taken
  int64_t pushes_late = 0;       // SYNC: for a step that closed without them
  int64_t requests_rejected = 0;
  int64_t nonfinite_rejected = 0;
  int live_workers = 0;
  int64_t lost_steps = 0;  // SYNC: steps skipped by fast-forwards
};

// Holds the blocks of one shard and applies pushes to them.
//
// Locking: `mu_` guards the bookkeeping (step, membership, de-duplication);
// each block has its own mutex guarding its numbers. The arithmetic runs
// under a block's mutex only, never under `mu_`, and nothing here does I/O.
// Thread-safe.
class ShardStore {
 public:
  // `job` must be validated (ValidateJobSpec). kInvalidArgument when `shard`
  // is out of range or the optimizer spec is bad.
  static absl::StatusOr<std::unique_ptr<ShardStore>> Create(
      const tessera::v1::JobSpec& job, int shard);

  ShardStore(const ShardStore&) = delete;
  ShardStore& operator=(const ShardStore&) = delete;

  // A worker opened a stream. Adopts a newer incarnation (the worker rejoins
  // at the current step); kFailedPrecondition for an older one, kInvalidArgument
  // for a worker id outside [0, num_workers).
  absl::Status Connect(int worker, int64_t incarnation);

  // A worker's stream ended: it leaves the barrier count (when `incarnation`
  // is still its current one and it has no other stream open), which may
  // complete the step in progress. SYNC with a departure grace: first waits
  // up to the grace for the worker to open a new stream, and returns
  // without effect when it does.
  void Disconnect(int worker, int64_t incarnation);

  // Steps `worker` has completed here (ASYNC/SSP: its highest pushed step
  // + 1, kept across incarnations; SYNC: 0). 0 for an unknown worker.
  int64_t WorkerClock(int worker) const;

  // How long Disconnect waits for a reconnect in SYNC mode (default 0).
  void SetDepartureGrace(absl::Duration grace);

  // Threads, the caller's included, that share the per-block work of a
  // push, step or pull (finiteness check, sums, optimizer, encoding) once
  // the blocks other than the largest hold kParallelBytes of it; 1 (the
  // default) keeps it on the caller. Results do not depend on it. Call
  // before serving.
  void SetApplyThreads(int threads);
  static constexpr int64_t kParallelBytes = int64_t{1} << 20;
  // Threads sharing large work (SetApplyThreads), and the calls whose
  // blocks they shared so far.
  int apply_threads() const { return pool_ != nullptr ? pool_->threads() : 1; }
  int64_t shared_apply_runs() const { return pool_ != nullptr ? pool_->shared_runs() : 0; }

  // Counts a request refused before it reached the store (a stream message
  // that is neither one push nor one pull), so that requests_rejected counts
  // every bad request.
  void CountRejected();

  // Validates every block first (ownership, dtype, size, duplicates,
  // finiteness); any problem rejects the whole push, is counted and changes
  // nothing. A push (worker, incarnation, step) takes effect at most once:
  // repeats and pushes for closed steps are acknowledged with applied=false.
  // `payloads`, when not empty, holds each block's bytes in block order
  // (for example in a same-host shared-memory region) and stands in for
  // the blocks' `data`; the views must stay valid for the call.
  absl::StatusOr<PushOutcome> Push(int worker, int64_t incarnation,
                                   const tessera::v1::PushRequest& request,
                                   absl::Span<const absl::string_view> payloads = {});

  // Waits until the consistency mode lets a worker at `step` read (SYNC:
  // `step` updates applied; SSP: slowest live worker within staleness;
  // ASYNC: never waits), then copies every block into `out`, reusing its
  // storage. kUnavailable after `timeout` or once Shutdown() was called.
  // With `area` (a same-host shared-memory reply area), payloads are
  // written there instead (64-byte aligned, shm_offset/shm_size set, `data`
  // empty); a block that does not fit stays inline.
  absl::Status Pull(int64_t step, absl::Duration timeout, tessera::v1::PullResult* out,
                    absl::Span<char> area = {});

  // Wakes every waiting Pull with kUnavailable; later pulls fail at once.
  void Shutdown();

  // Copies every block's state; SYNC waits until no step is being applied,
  // so the copy holds whole steps only.
  ShardState Snapshot();

  // Replaces this shard's numbers with a checkpoint's. Call before serving.
  void Restore(const RestoredModel& model);

  // Checkpoint hook: called with a snapshot taken on the applying thread
  // (no update can slip in between) whenever the step (SYNC) or version
  // (ASYNC/SSP) reaches a multiple of `every_steps` (0: never), and after
  // RequestCheckpoint(). Runs outside every lock; must not block for long.
  // Set before serving.
  void SetCheckpointHook(int64_t every_steps, std::function<void(ShardState)> hook);

  // Asks for a checkpoint: SYNC with a step in flight takes it when that
  // step completes; otherwise it is taken now, on this thread.
  void RequestCheckpoint();

  StoreStats stats() const;
  // Sum of every parameter, in double precision (a checksum for tests).
  double ParamSum() const;
  int shard() const { return shard_; }
  int num_slots() const { return optimizer_->num_slots(); }
  const Partition& partition() const { return partition_; }

 private:
  struct Block {
    BlockInfo info;
    absl::Mutex mu;
    AlignedBuffer params ABSL_GUARDED_BY(mu);
    std::vector<AlignedBuffer> slots ABSL_GUARDED_BY(mu);
    AlignedBuffer accum ABSL_GUARDED_BY(mu);  // SYNC: sum of this step's grads
    AlignedBuffer scratch ABSL_GUARDED_BY(mu);  // compressed gradients, widened
    int64_t updates ABSL_GUARDED_BY(mu) = 0;
  };
  // Per-worker state, indexed by worker id.
  struct WorkerState {
    int64_t incarnation = 0;
    int64_t last_step = -1;  // highest step pushed by this incarnation
    int64_t clock = 0;       // SSP/ASYNC: steps completed
    int streams = 0;         // open streams of this incarnation
    bool live = true;
  };

  ShardStore(const tessera::v1::JobSpec& job, int shard, Partition partition,
             std::unique_ptr<Optimizer> optimizer);

  // Sets *nonfinite when the rejection is for NaN or infinite values.
  absl::Status Validate(const tessera::v1::PushRequest& request,
                        absl::Span<const absl::string_view> payloads,
                        bool* nonfinite) const;
  // SYNC: true when every live worker, or quorum_ workers, have contributed
  // to the open step and no accumulation is still running; the caller must
  // then run ApplyStep.
  bool StepCompleteLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Applies the step and bumps the step counter; the applying thread calls
  // it once StepCompleteLocked() said so (with applying_ set).
  void CompleteStep(int contributors, int64_t step) ABSL_LOCKS_EXCLUDED(mu_);
  void ApplyStep(int contributors, int64_t step) ABSL_LOCKS_EXCLUDED(mu_);
  // Copies the blocks; the caller guarantees no apply runs meanwhile.
  ShardState CopyBlocks(int64_t step, int64_t version);
  void ApplyDirect(const tessera::v1::PushRequest& request,
                   absl::Span<const absl::string_view> payloads);
  // One optimizer update of block `b` with `grad` (F32, the block's length).
  void ApplyToBlockLocked(Block* b, float lr, const float* grad) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(b->mu);
  bool PullReadyLocked(int64_t step) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // fn(i) for i in [0, n): on the apply threads when the blocks other
  // than the largest (bytes_of(i) each) hold kParallelBytes or more, else
  // in order on this thread.
  void ForEachBlock(int n, absl::FunctionRef<int64_t(int)> bytes_of,
                    absl::FunctionRef<void(int)> fn) const;
  // bytes_of for the owned blocks (F32 parameters, sums, slots alike).
  std::function<int64_t(int)> OwnedSizes() const;
  int64_t SlowestClockLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Constant after construction.
  const tessera::v1::JobSpec job_;
  const int shard_;
  const tessera::v1::ConsistencyMode mode_;
  const tessera::v1::DType wire_dtype_;  // of pulled parameters
  // SYNC: gradients that close a step (num_workers - backup_workers).
  const int quorum_;
  const Partition partition_;
  const std::unique_ptr<Optimizer> optimizer_;
  // Indexed by block id; null for blocks of other shards.
  std::vector<std::unique_ptr<Block>> blocks_;
  std::vector<Block*> owned_;  // this shard's blocks, ascending id

  mutable absl::Mutex mu_;
  std::vector<WorkerState> workers_ ABSL_GUARDED_BY(mu_);
  int64_t step_ ABSL_GUARDED_BY(mu_) = 0;  // SYNC: completed steps
  int64_t version_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_set<int> contributed_ ABSL_GUARDED_BY(mu_);
  int accumulating_ ABSL_GUARDED_BY(mu_) = 0;
  bool applying_ ABSL_GUARDED_BY(mu_) = false;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  bool checkpoint_pending_ ABSL_GUARDED_BY(mu_) = false;
  // SYNC: true until the first step completes here. A shard restarted
  // from a checkpoint while its workers kept going gets pushes for later
  // steps; while recovering, it jumps to the workers' step (dropping an
  // open step's partial sums) instead of refusing them.
  bool recovering_ ABSL_GUARDED_BY(mu_) = true;
  // Set before serving, then constant.
  std::unique_ptr<ApplyPool> pool_;  // null: one thread
  int64_t checkpoint_every_ = 0;
  std::function<void(ShardState)> checkpoint_hook_;
  StoreStats counters_ ABSL_GUARDED_BY(mu_);
  absl::Duration departure_grace_ ABSL_GUARDED_BY(mu_) = absl::ZeroDuration();
};

}  // namespace tessera

#endif  // TESSERA_SERVER_SHARD_STORE_H_
