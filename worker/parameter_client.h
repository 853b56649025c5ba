// The worker's view of the parameter servers: pull parameters, push
// gradients. Implemented over gRPC streams (grpc_parameter_client.h) and,
// for tests, directly on in-process stores.

#ifndef TESSERA_WORKER_PARAMETER_CLIENT_H_
#define TESSERA_WORKER_PARAMETER_CLIENT_H_

#include <cstdint>

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
  };

  // Pushes the gradients of `step` to every shard and fills `params` with
  // the parameters for step + 1 or later (fused push-pull).
  virtual absl::StatusOr<PushPullResult> PushAndPull(int64_t step,
                                                     absl::Span<const float> grads,
                                                     absl::Span<float> params) = 0;

  // ASYNC/SSP: the step a (re)started worker continues from: the steps its
  // id already completed on every shard (an earlier incarnation's), as the
  // servers said when the streams opened. 0 for a fresh job or SYNC.
  virtual int64_t resume_step() const { return 0; }

  // Tensor payload bytes sent plus received so far (0 where nothing
  // travels over a wire).
  virtual int64_t payload_bytes() const { return 0; }
};

}  // namespace tessera

#endif  // TESSERA_WORKER_PARAMETER_CLIENT_H_
