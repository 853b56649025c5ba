#include "worker/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "absl/status/status.h"
#include "common/aligned_buffer.h"
#include "absl/strings/str_cat.h"

namespace tessera {
namespace {

using RowMatrix =
    Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixMap = Eigen::Map<RowMatrix>;
using ConstMatrixMap = Eigen::Map<const RowMatrix>;
using RowVectorMap = Eigen::Map<Eigen::RowVectorXf>;
using ConstRowVectorMap = Eigen::Map<const Eigen::RowVectorXf>;

// Scratch space is capped so a typo in a flag cannot ask for terabytes.
constexpr int64_t kMaxScratchFloats = int64_t{1} << 32;

struct Layer {
  int64_t in = 0;
  int64_t out = 0;
  int64_t weight_offset = 0;
  int64_t bias_offset = 0;
};

class CpuBackend final : public GradientBackend {
 public:
  CpuBackend(std::vector<Layer> layers, LossKind loss, int64_t total_params,
             int64_t max_batch)
      : layers_(std::move(layers)),
        loss_(loss),
        total_params_(total_params),
        max_batch_(max_batch) {
    int64_t widest = 0;
    for (const Layer& layer : layers_) {
      activations_.emplace_back(max_batch_ * layer.out);
      widest = std::max(widest, layer.out);
    }
    delta_.resize(max_batch_ * widest);
    delta_prev_.resize(max_batch_ * widest);
  }

  std::string_view name() const override { return "cpu"; }

  absl::StatusOr<float> ComputeGradients(absl::Span<const float> params,
                                         const Batch& batch,
                                         absl::Span<float> grads) override {
    return ComputeGradientsReporting(params, batch, grads, nullptr);
  }

  // Backward runs last layer first. Biases are not read after the forward
  // pass, so a layer's bias is ready once its gradient is written; a
  // weight once the gradient for the layer below has been taken through it
  // (the first layer's at once).
  absl::StatusOr<float> ComputeGradientsReporting(absl::Span<const float> params,
                                                  const Batch& batch,
                                                  absl::Span<float> grads,
                                                  const GradientReadyFn& ready) override {
    if (grads.size() != static_cast<size_t>(total_params_)) {
      return absl::InvalidArgumentError(
          absl::StrCat("grads has ", grads.size(), " floats, model has ",
                       total_params_, " parameters"));
    }
    if (absl::Status s = Validate(params, batch); !s.ok()) return s;
    const int64_t rows = batch.rows;
    Forward(params.data(), batch);
    const double loss_sum = OutputLoss(batch, delta_.data(), nullptr);

    // delta_ holds dLoss/dZ of the current layer; delta_prev_ receives the
    // gradient flowing into the layer below.
    for (int64_t l = static_cast<int64_t>(layers_.size()) - 1; l >= 0; --l) {
      const Layer& layer = layers_[l];
      ConstMatrixMap dz(delta_.data(), rows, layer.out);
      ConstMatrixMap input = LayerInput(l, batch);
      MatrixMap dw(grads.data() + layer.weight_offset, layer.out, layer.in);
      RowVectorMap db(grads.data() + layer.bias_offset, layer.out);
      db.noalias() = dz.colwise().sum();
      if (ready) ready(static_cast<int>(2 * l + 1));
      dw.noalias() = dz.transpose() * input;
      if (l == 0) {
        if (ready) ready(0);
        break;
      }
      ConstMatrixMap w(params.data() + layer.weight_offset, layer.out,
                       layer.in);
      MatrixMap da(delta_prev_.data(), rows, layer.in);
      da.noalias() = dz * w;
      if (ready) ready(static_cast<int>(2 * l));
      // The layer below applied ReLU; its stored output is positive exactly
      // where the derivative is 1.
      da.array() = (input.array() > 0.0f).select(da.array(), 0.0f);
      std::swap(delta_, delta_prev_);
    }
    return static_cast<float>(loss_sum / rows);
  }

  absl::StatusOr<EvalResult> Evaluate(absl::Span<const float> params,
                                      const Batch& batch) override {
    if (absl::Status s = Validate(params, batch); !s.ok()) return s;
    Forward(params.data(), batch);
    EvalResult result;
    result.loss_sum = OutputLoss(batch, nullptr, &result.correct);
    result.count = batch.rows;
    return result;
  }

 private:
  int64_t input_dim() const { return layers_.front().in; }
  int64_t output_dim() const { return layers_.back().out; }

  absl::Status Validate(absl::Span<const float> params,
                        const Batch& batch) const {
    return ValidateBatch(loss_, total_params_, max_batch_, output_dim(), params, batch);
  }

  // The matrix fed into layer l: the batch features or the previous layer's
  // post-activation output.
  ConstMatrixMap LayerInput(int64_t l, const Batch& batch) const {
    if (l == 0) return ConstMatrixMap(batch.features, batch.rows, input_dim());
    return ConstMatrixMap(activations_[l - 1].data(), batch.rows,
                          layers_[l - 1].out);
  }

  // Fills activations_[l] for every layer; the last one holds raw outputs.
  void Forward(const float* params, const Batch& batch) {
    const int64_t last = static_cast<int64_t>(layers_.size()) - 1;
    for (int64_t l = 0; l <= last; ++l) {
      const Layer& layer = layers_[l];
      ConstMatrixMap w(params + layer.weight_offset, layer.out, layer.in);
      ConstRowVectorMap b(params + layer.bias_offset, layer.out);
      MatrixMap z(activations_[l].data(), batch.rows, layer.out);
      z.noalias() = LayerInput(l, batch) * w.transpose();
      if (l < last) {
        z = (z.rowwise() + b).cwiseMax(0.0f);
      } else {
        z.rowwise() += b;
      }
    }
  }

  // Returns the per-row loss summed over the batch. If `dz` is non-null it
  // receives d(mean loss)/d(outputs), rows x output_dim. If `correct` is
  // non-null it receives the number of argmax hits (classification only).
  double OutputLoss(const Batch& batch, float* dz, int64_t* correct) const {
    const int64_t rows = batch.rows;
    const int64_t k = output_dim();
    const float* out = activations_.back().data();
    double loss_sum = 0;
    if (loss_ == LossKind::kMeanSquaredError) {
      const float scale = 2.0f / static_cast<float>(rows * k);
      for (int64_t i = 0; i < rows * k; ++i) {
        const float diff = out[i] - batch.targets[i];
        loss_sum += double(diff) * diff;
        if (dz != nullptr) dz[i] = scale * diff;
      }
      if (correct != nullptr) *correct = 0;
      return loss_sum / k;
    }
    const float inv_rows = 1.0f / static_cast<float>(rows);
    int64_t hits = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const float* z = out + r * k;
      const int32_t label = batch.labels[r];
      int64_t argmax = 0;
      for (int64_t j = 1; j < k; ++j) {
        if (z[j] > z[argmax]) argmax = j;
      }
      hits += argmax == label;
      // Shifting by the row max keeps exp() from overflowing.
      const float max = z[argmax];
      double sum = 0;
      for (int64_t j = 0; j < k; ++j) sum += std::exp(double(z[j] - max));
      const double log_sum = std::log(sum);
      loss_sum += log_sum - double(z[label] - max);
      if (dz != nullptr) {
        float* d = dz + r * k;
        for (int64_t j = 0; j < k; ++j) {
          d[j] = static_cast<float>(std::exp(double(z[j] - max) - log_sum)) *
                 inv_rows;
        }
        d[label] -= inv_rows;
      }
    }
    if (correct != nullptr) *correct = hits;
    return loss_sum;
  }

  const std::vector<Layer> layers_;
  const LossKind loss_;
  const int64_t total_params_;
  const int64_t max_batch_;
  std::vector<AlignedVector<float>> activations_;  // per layer, max_batch x out
  AlignedVector<float> delta_;
  AlignedVector<float> delta_prev_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<GradientBackend>> CreateCpuBackend(
    const ModelSpec& model, int64_t max_batch) {
  if (max_batch <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_batch ", max_batch, " is not positive"));
  }
  const size_t num_layers =
      model.layer_sizes.empty() ? 0 : model.layer_sizes.size() - 1;
  if (num_layers == 0 || model.params.size() != 2 * num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model '", model.kind, "' has ", model.layer_sizes.size(),
        " layer sizes and ", model.params.size(),
        " params; expected at least 2 sizes and 2 params per layer"));
  }
  const std::vector<int64_t> offsets = model.param_offsets();
  std::vector<Layer> layers;
  int64_t scratch_per_row = 0;
  for (size_t l = 0; l < num_layers; ++l) {
    Layer layer;
    layer.in = model.layer_sizes[l];
    layer.out = model.layer_sizes[l + 1];
    layer.weight_offset = offsets[2 * l];
    layer.bias_offset = offsets[2 * l + 1];
    const ParamSpec& w = model.params[2 * l];
    const ParamSpec& b = model.params[2 * l + 1];
    if (layer.in <= 0 || layer.out <= 0 ||
        w.shape != std::vector<int64_t>{layer.out, layer.in} ||
        b.shape != std::vector<int64_t>{layer.out}) {
      return absl::InvalidArgumentError(
          absl::StrCat("model params '", w.name, "' / '", b.name,
                       "' do not match layer sizes ", layer.in, " -> ",
                       layer.out));
    }
    scratch_per_row += 3 * layer.out;  // activations plus two delta buffers
    layers.push_back(layer);
  }
  if (max_batch > kMaxScratchFloats / scratch_per_row) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_batch ", max_batch, " needs more than ",
                     kMaxScratchFloats, " floats of scratch for model '",
                     model.kind, "'"));
  }
  return std::make_unique<CpuBackend>(std::move(layers), model.loss,
                                      model.total_params(), max_batch);
}

}  // namespace tessera
