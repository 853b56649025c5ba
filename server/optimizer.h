// Server-side update rules: the optimizer a parameter server applies to each
// block of parameters when gradients for it arrive.
//
// Transport-free on purpose so the math can be tested and benchmarked without
// a server. The element-wise kernels run on the hot path at memory bandwidth;
// they allocate nothing and make a single pass over the caller's buffers.

#ifndef TESSERA_SERVER_OPTIMIZER_H_
#define TESSERA_SERVER_OPTIMIZER_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "proto/tessera.pb.h"

namespace tessera {

// A validated optimizer with its learning-rate schedule.
//
// The update rules follow torch.optim's documented algorithms (SGD with
// dampening 0, Adam, AdamW, Adagrad with lr_decay 0) so results can be checked
// against a PyTorch run of the same job.
//
// Per-element state (momentum buffers, Adam moments, Adagrad accumulators)
// lives with the caller, next to the parameters it belongs to, so one
// Optimizer serves every block of a shard.
//
// Thread-safety: immutable after Create(); every method is const and may be
// called concurrently, including Apply() on different blocks. Concurrent
// Apply() calls on the same block must be serialised by the caller.
class Optimizer {
 public:
  // Validates `spec` and fills defaults for the fields its type uses: beta1
  // 0.9 and beta2 0.999 (ADAM, ADAMW) and epsilon 1e-8 (ADAM, ADAMW) or 1e-10
  // (ADAGRAD), each when 0. Fields a type does not use are still checked so
  // a mistyped job fails early rather than silently.
  //
  // Errors are kInvalidArgument naming the field, e.g.
  // "optimizer.learning_rate: must be positive and finite, got -1", for: an
  // unspecified or unknown type or schedule; learning_rate <= 0 or
  // non-finite; momentum, beta1 or beta2 outside [0, 1); negative or
  // non-finite epsilon, weight_decay or initial_accumulator; negative
  // warmup_steps or decay_steps; a STEP schedule without positive
  // decay_steps or with decay_rate outside (0, 1]; a COSINE schedule without
  // positive decay_steps; min_learning_rate negative, non-finite or above
  // learning_rate.
  static absl::StatusOr<std::unique_ptr<Optimizer>> Create(
      const tessera::v1::OptimizerSpec& spec);

  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // Number of per-element state arrays Apply() expects: SGD 0, MOMENTUM 1
  // (momentum buffer), ADAM and ADAMW 2 (first, second moment), ADAGRAD 1
  // (squared-gradient accumulator).
  int num_slots() const { return num_slots_; }

  // Value every element of slot `k` must hold before the first Apply():
  // initial_accumulator for Adagrad's accumulator, 0 otherwise (also for a
  // `k` outside [0, num_slots())).
  float SlotInitialValue(int k) const;

  // Learning rate for the 0-based `global_step` (negative steps count as 0).
  // During warm-up (step < warmup_steps) it rises linearly:
  // lr * (step + 1) / warmup_steps. Afterwards, with s = step - warmup_steps:
  //   CONSTANT: lr
  //   STEP:     lr * decay_rate^floor(s / decay_steps)
  //   COSINE:   min + (lr - min) * 0.5 * (1 + cos(pi * min(s, decay_steps) /
  //             decay_steps)), so it stays at min_learning_rate after the end.
  double LearningRate(int64_t global_step) const;

  // Applies one update to `n` elements in place.
  //
  // `update_count` is the 1-based number of updates this block has received,
  // this one included; Adam's bias correction depends on it, so it must count
  // per block rather than per job (values below 1 are treated as 1). `lr` is
  // normally LearningRate() of the step the gradient belongs to. `slots`
  // holds num_slots() pointers to `n` floats each, initialised with
  // SlotInitialValue() and otherwise only touched by Apply(); it may be null
  // when num_slots() is 0. Buffers may have any alignment but must not
  // overlap one another. Does nothing when n <= 0.
  //
  // Per element, with g' = g + weight_decay * p unless noted:
  //   SGD:      p -= lr * g'
  //   MOMENTUM: b = momentum * b + g'; p -= lr * (nesterov ? g' +
  //             momentum * b : b)
  //   ADAM:     m = b1 m + (1-b1) g'; v = b2 v + (1-b2) g'^2;
  //             p -= lr / (1-b1^t) * m / (sqrt(v) / sqrt(1-b2^t) + eps)
  //   ADAMW:    p *= 1 - lr * weight_decay, then ADAM's rule with g' = g
  //   ADAGRAD:  a += g'^2; p -= lr * g' / (sqrt(a) + eps)
  void Apply(int64_t update_count, float lr, float* params, const float* grad,
             float* const* slots, int64_t n) const;

  // The spec with defaults filled.
  const tessera::v1::OptimizerSpec& spec() const { return spec_; }

 private:
  explicit Optimizer(const tessera::v1::OptimizerSpec& spec);

  const tessera::v1::OptimizerSpec spec_;
  const int num_slots_;
};

}  // namespace tessera

#endif  // TESSERA_SERVER_OPTIMIZER_H_
