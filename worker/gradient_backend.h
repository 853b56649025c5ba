// The single interface through which workers do gradient math, so that a
// device implementation can replace the CPU one without touching callers.

#ifndef TESSERA_WORKER_GRADIENT_BACKEND_H_
#define TESSERA_WORKER_GRADIENT_BACKEND_H_

#include <cstdint>
#include <functional>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "common/model_spec.h"

namespace tessera {

// One mini-batch in host memory, row-major. The pointers are borrowed and
// must stay valid for the duration of the call that receives the batch.
// Exactly the field the model's loss needs must be set: `labels` for softmax
// cross-entropy, `targets` for mean squared error.
struct Batch {
  const float* features = nullptr;  // rows x input_dim
  int64_t rows = 0;
  const int32_t* labels = nullptr;  // rows class ids in [0, output_dim)
  const float* targets = nullptr;   // rows x output_dim
};

// Forward-only statistics over one batch. Sums rather than means so results
// from several batches (or several workers) can be added before dividing.
struct EvalResult {
  double loss_sum = 0;  // per-row loss summed over rows
  int64_t correct = 0;  // rows whose argmax equals the label; 0 for MSE
  int64_t count = 0;    // rows evaluated
};

// Computes losses and gradients of one fixed model. Not thread-safe: use one
// instance per worker thread.
class GradientBackend {
 public:
  virtual ~GradientBackend() = default;

  // Short identifier such as "cpu", for logs and metrics.
  virtual std::string_view name() const = 0;

  // `params` holds model.total_params() floats: the model's parameters in
  // ModelSpec::params order, concatenated. On success `grads` (same layout
  // and size) is fully overwritten with d(mean batch loss)/d(param) and the
  // mean loss over the batch is returned. Bad input (rows <= 0 or above the
  // backend's max batch, wrong span sizes, a label out of range, a null
  // pointer for a needed field) returns kInvalidArgument naming the problem
  // and leaves `grads` untouched.
  virtual absl::StatusOr<float> ComputeGradients(absl::Span<const float> params,
                                                 const Batch& batch,
                                                 absl::Span<float> grads) = 0;

  // Told a parameter index (ModelSpec::params order) during
  // ComputeGradientsReporting.
  using GradientReadyFn = std::function<void(int param_index)>;

  // ComputeGradients that also calls `ready(p)` once for each parameter p
  // whose gradient is final before the call returns: from that moment the
  // call neither writes p's gradient nor reads p's values again, so the
  // caller may send the one and overwrite the other while backward goes on
  // (the worker pushes each parameter's gradient, or each shard's, as soon
  // as it is ready, last layer first). Parameters never reported are final when the
  // call returns. Bad input reports nothing. The default reports nothing
  // early (a backend that copies gradients back only at the end).
  virtual absl::StatusOr<float> ComputeGradientsReporting(absl::Span<const float> params,
                                                          const Batch& batch,
                                                          absl::Span<float> grads,
                                                          const GradientReadyFn& ready) {
    (void)ready;
    return ComputeGradients(params, batch, grads);
  }

  // Forward pass only, with the same validation as ComputeGradients.
  // Batches larger than the backend's max batch must be split by the caller.
  virtual absl::StatusOr<EvalResult> Evaluate(absl::Span<const float> params,
                                              const Batch& batch) = 0;
};

// The checks both implementations make before touching any buffer: the
// parameter count, 1 <= rows <= max_batch, the input pointers the loss
// needs, and every label within [0, output_dim). kInvalidArgument naming
// the problem.
inline absl::Status ValidateBatch(LossKind loss, int64_t total_params, int64_t max_batch,
                                  int64_t output_dim, absl::Span<const float> params,
                                  const Batch& batch) {
  if (params.size() != static_cast<size_t>(total_params)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "params has ", params.size(), " floats, model has ", total_params, " parameters"));
  }
  if (batch.rows <= 0 || batch.rows > max_batch) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch rows ", batch.rows, " outside [1, ", max_batch, "] (max_batch)"));
  }
  if (batch.features == nullptr) return absl::InvalidArgumentError("batch features is null");
  if (loss == LossKind::kMeanSquaredError) {
    if (batch.targets == nullptr) {
      return absl::InvalidArgumentError("batch targets is null but the loss is mean squared error");
    }
    return absl::OkStatus();
  }
  if (batch.labels == nullptr) {
    return absl::InvalidArgumentError("batch labels is null but the loss is softmax cross-entropy");
  }
  for (int64_t r = 0; r < batch.rows; ++r) {
    const int32_t label = batch.labels[r];
    if (label < 0 || label >= output_dim) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch label ", label, " at row ", r, " outside [0, ", output_dim, ")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace tessera

#endif  // TESSERA_WORKER_GRADIENT_BACKEND_H_
