// Model description shared by the server (which owns and initializes the
// parameters) and the workers (which compute gradients over them).

#ifndef TESSERA_COMMON_MODEL_SPEC_H_
#define TESSERA_COMMON_MODEL_SPEC_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tessera {

// The training objective applied to the last layer's outputs.
enum class LossKind {
  // Mean over rows of -log softmax(logits)[label]; batches carry labels.
  kSoftmaxCrossEntropy,
  // Mean over all rows*outputs of (out - target)^2; batches carry targets.
  kMeanSquaredError,
};

// One parameter tensor of a fully connected layer.
struct ParamSpec {
  std::string name;            // "fc0.weight", "fc0.bias", "fc1.weight", ...
  std::vector<int64_t> shape;  // weight: {out, in} row-major; bias: {out}
  int64_t fan_in = 0;          // in-features of the layer
  bool is_bias = false;

  // Product of `shape`.
  int64_t num_elements() const;
};

// A stack of fully connected layers. Parameters live in one flat float buffer
// holding `params` concatenated in order; every component (server shards,
// worker backends, checkpoints) agrees on that layout through this struct.
struct ModelSpec {
  std::string kind;                  // "mlp" or "linear"
  std::vector<int64_t> layer_sizes;  // e.g. {784, 256, 128, 10}
  LossKind loss = LossKind::kSoftmaxCrossEntropy;
  std::vector<ParamSpec> params;     // per layer l: fc{l}.weight, fc{l}.bias

  // layer_sizes.front() and layer_sizes.back(); 0 for an empty spec.
  int64_t input_dim() const;
  int64_t output_dim() const;
  // Sum of num_elements() over `params`.
  int64_t total_params() const;
  // offsets[i] is where params[i] starts in the flat buffer.
  std::vector<int64_t> param_offsets() const;
};

// Largest layer width ParseModelSpec accepts.
inline constexpr int64_t kMaxLayerSize = int64_t{1} << 24;

// Parses "mlp:784-256-128-10" (ReLU between layers, none after the last) or
// "linear:10-1" (exactly two sizes: one layer, no activation). Returns
// kInvalidArgument naming the spec and the problem for an unknown kind, fewer
// than two sizes, a non-numeric or non-positive size, a size above
// kMaxLayerSize, or a linear spec without exactly two sizes.
absl::StatusOr<ModelSpec> ParseModelSpec(absl::string_view spec, LossKind loss);

// Writes the initial values of elements [begin, end) of parameter
// `param_index` (whose spec is `p`) to out[0, end - begin). Element i's value
// depends only on (seed, param_index, i), so server shards that each own a
// slice of a tensor produce exactly the values a single process would.
// Values are uniform in [-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and
// biases alike, matching PyTorch's nn.Linear default.
// Requires 0 <= begin <= end <= p.num_elements().
void InitParameter(const ParamSpec& p, int param_index, uint64_t seed,
                   int64_t begin, int64_t end, float* out);

}  // namespace tessera

#endif  // TESSERA_COMMON_MODEL_SPEC_H_
