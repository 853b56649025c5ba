// The worker's view of the parameter servers: pull parameters, push
// gradients. Implemented over gRPC streams (grpc_parameter_client.h) and,
// for tests, directly on in-process stores.

#ifndef TESSERA_WORKER_PARAMETER_CLIENT_H_
#define TESSERA_WORKER_PARAMETER_CLIENT_H_

#include <cstdint>
#include <optional>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace tessera {

// Both calls work on the model's flat parameter layout (ModelSpec::params
// concatenated). Not thread-safe: one caller at a time.
class ParameterClient {
 public:
  virtual ~ParameterClient() = default;

  // Fills `params` with every shard's parameters as a worker at `step` may
  // see them (SYNC waits for `step` applied updates). Returns the smallest
  // version reported by the shards.
  virtual absl::StatusOr<int64_t> Pull(int64_t step, absl::Span<float> params) = 0;

  struct PushPullResult {
    // Shards that acknowledged the push without applying it (duplicates or
    // closed steps).
    int not_applied = 0;
    // Smallest version among the parameters received (SYNC: the step they
    // belong to, step + 1 or more when the others went on without us).
    int64_t version = 0;
    // Of not_applied, the shards whose step had closed without the push
    // (late, not a repeat).
    int late = 0;
  };

  // Pushes the gradients of `step` to every shard and fills `params` with
  // the parameters for step + 1 or later (fused push-pull).
  virtual absl::StatusOr<PushPullResult> PushAndPull(int64_t step,
                                                     absl::Span<const float> grads,
                                                     absl::Span<float> params) = 0;

  // PushAndPull in three parts, so that shards can be pushed while the
  // gradient is still being computed. StartPushAndPull arms the exchange
  // for `step` over `grads` and `params` (both must outlive it);
  // MarkParamReady(p) says that parameter p's gradient is final and that
  // the caller no longer reads parameter p's values, so a shard whose
  // parameters are all ready may leave at once and write what it pulls
  // into `params`; FinishPushAndPull marks every parameter ready, waits for
  // all shards and returns what PushAndPull would. AbortPushAndPull (after
  // a failed computation) sends nothing more, waits for the shards already
  // under way and ends the exchange. Between Start and Finish or Abort,
  // other calls fail with kFailedPrecondition (the gRPC client's). This
  // default waits for Finish and then calls PushAndPull.
  virtual absl::Status StartPushAndPull(int64_t step, absl::Span<const float> grads,
                                        absl::Span<float> params) {
    pending_.emplace(PendingExchange{step, grads, params});
    return absl::OkStatus();
  }
  virtual void MarkParamReady(int param_index) { (void)param_index; }
  virtual absl::StatusOr<PushPullResult> FinishPushAndPull() {
    if (!pending_.has_value()) {
      return absl::FailedPreconditionError("FinishPushAndPull without StartPushAndPull");
    }
    const PendingExchange e = *pending_;
    pending_.reset();
    return PushAndPull(e.step, e.grads, e.params);
  }
  virtual void AbortPushAndPull() { pending_.reset(); }

  // ASYNC/SSP: the step a (re)started worker continues from: the steps its
  // id already completed on every shard (an earlier incarnation's), as the
  // servers said when the streams opened. 0 for a fresh job or SYNC.
  virtual int64_t resume_step() const { return 0; }

  // Tensor payload bytes sent plus received so far (0 where nothing
  // travels over a wire).
  virtual int64_t payload_bytes() const { return 0; }

  // Shard pushes of the split form that began to leave while some
  // parameter was not yet ready, i.e. while backward was still running (on
  // the gRPC stream, pushes whose first part did); 0 where shards are not
  // sent separately.
  virtual int64_t early_pushes() const { return 0; }

 private:
  struct PendingExchange {
    int64_t step;
    absl::Span<const float> grads;
    absl::Span<float> params;
  };
  std::optional<PendingExchange> pending_;  // the default split form's
};

}  // namespace tessera

#endif  // TESSERA_WORKER_PARAMETER_CLIENT_H_
