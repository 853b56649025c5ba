// Threads for the per-block work of one push, step or pull: checking a
// push's payloads, adding them into the step's sums, running the
// optimizer, encoding pulled parameters. A shard's blocks are independent
// (each has its own numbers and mutex), so the results are the same
// whether one thread or several do the work, bit for bit. ShardStore
// decides when the work is large enough to share (SetApplyThreads).

#ifndef TESSERA_SERVER_APPLY_POOL_H_
#define TESSERA_SERVER_APPLY_POOL_H_

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/synchronization/mutex.h"

namespace tessera {

// Thread-safe. One Run at a time uses the helper threads; a Run that finds
// them taken (another session's push, in ASYNC or SSP mode) does its work
// on its own thread, so no caller waits for another's blocks.
class ApplyPool {
 public:
  // `threads` in all, the calling thread included: threads - 1 helpers.
  // 1 (or less) runs everything on the caller.
  explicit ApplyPool(int threads);
  ~ApplyPool();

  ApplyPool(const ApplyPool&) = delete;
  ApplyPool& operator=(const ApplyPool&) = delete;

  int threads() const { return static_cast<int>(helpers_.size()) + 1; }

  // Calls fn(i) once for every i in [0, n), on the calling thread and the
  // helpers, and returns when every call has returned. fn must not call
  // Run.
  void Run(int n, absl::FunctionRef<void(int)> fn);

  // Runs so far that had the helpers (for tests and diagnostics).
  int64_t shared_runs() const { return shared_runs_.load(std::memory_order_relaxed); }

 private:
  // Claims and runs tasks of the current Run until none is left.
  void Work() ABSL_LOCKS_EXCLUDED(mu_);
  void HelperLoop() ABSL_LOCKS_EXCLUDED(mu_);

  absl::Mutex run_mu_;  // held by the Run that has the helpers
  absl::Mutex mu_;
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;  // one per Run with helpers
  const absl::FunctionRef<void(int)>* fn_ ABSL_GUARDED_BY(mu_) = nullptr;
  int n_ ABSL_GUARDED_BY(mu_) = 0;
  int next_ ABSL_GUARDED_BY(mu_) = 0;      // next task to claim
  int finished_ ABSL_GUARDED_BY(mu_) = 0;  // tasks whose call returned
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::atomic<int64_t> shared_runs_{0};
  std::vector<std::thread> helpers_;  // last: start after the fields above
};

// CPUs this process may run on: its affinity mask, lowered to the CPU
// quota of the cgroup mounted at /sys/fs/cgroup (v2 cpu.max, or v1
// cpu/cpu.cfs_quota_us; a container's own) when one is set, rounded up.
// At least 1.
int AvailableCpus();

// The servers' default number of apply threads: AvailableCpus(), at most 4.
int DefaultApplyThreads();

}  // namespace tessera

#endif  // TESSERA_SERVER_APPLY_POOL_H_
