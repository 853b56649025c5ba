#include "common/model_spec.h"

#include <cmath>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace tessera {
namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

absl::Status SpecError(absl::string_view spec, absl::string_view problem) {
  return absl::InvalidArgumentError(
      absl::StrCat("model spec '", spec, "': ", problem));
}

}  // namespace

int64_t ParamSpec::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t ModelSpec::input_dim() const {
  return layer_sizes.empty() ? 0 : layer_sizes.front();
}

int64_t ModelSpec::output_dim() const {
  return layer_sizes.empty() ? 0 : layer_sizes.back();
}

int64_t ModelSpec::total_params() const {
  int64_t total = 0;
  for (const ParamSpec& p : params) total += p.num_elements();
  return total;
}

std::vector<int64_t> ModelSpec::param_offsets() const {
  std::vector<int64_t> offsets;
  offsets.reserve(params.size());
  int64_t offset = 0;
  for (const ParamSpec& p : params) {
    offsets.push_back(offset);
    offset += p.num_elements();
  }
  return offsets;
}

absl::StatusOr<ModelSpec> ParseModelSpec(absl::string_view spec,
                                         LossKind loss) {
  std::pair<absl::string_view, absl::string_view> kind_sizes =
      absl::StrSplit(spec, absl::MaxSplits(':', 1));
  const absl::string_view kind = kind_sizes.first;
  if (kind != "mlp" && kind != "linear") {
    return SpecError(spec, absl::StrCat("unknown kind '", kind,
                                        "' (expected 'mlp' or 'linear')"));
  }
  ModelSpec model;
  model.kind = std::string(kind);
  model.loss = loss;
  if (!kind_sizes.second.empty()) {
    for (absl::string_view token : absl::StrSplit(kind_sizes.second, '-')) {
      int64_t size = 0;
      if (!absl::SimpleAtoi(token, &size)) {
        return SpecError(spec, absl::StrCat("layer size '", token,
                                            "' is not a number"));
      }
      if (size <= 0) {
        return SpecError(spec,
                         absl::StrCat("layer size ", size, " is not positive"));
      }
      if (size > kMaxLayerSize) {
        return SpecError(spec, absl::StrCat("layer size ", size,
                                            " exceeds the limit of ",
                                            kMaxLayerSize));
      }
      model.layer_sizes.push_back(size);
    }
  }
  if (model.layer_sizes.size() < 2) {
    return SpecError(spec, absl::StrCat("needs at least 2 layer sizes, got ",
                                        model.layer_sizes.size()));
  }
  if (kind == "linear" && model.layer_sizes.size() != 2) {
    return SpecError(spec, absl::StrCat("linear needs exactly 2 layer sizes, "
                                        "got ",
                                        model.layer_sizes.size()));
  }
  for (size_t l = 0; l + 1 < model.layer_sizes.size(); ++l) {
    const int64_t in = model.layer_sizes[l];
    const int64_t out = model.layer_sizes[l + 1];
    model.params.push_back({absl::StrCat("fc", l, ".weight"), {out, in}, in,
                            /*is_bias=*/false});
    model.params.push_back(
        {absl::StrCat("fc", l, ".bias"), {out}, in, /*is_bias=*/true});
  }
  return model;
}

void InitParameter(const ParamSpec& p, int param_index, uint64_t seed,
                   int64_t begin, int64_t end, float* out) {
  const double bound = p.fan_in > 0 ? 1.0 / std::sqrt(double(p.fan_in)) : 0.0;
  // Hashing the seed once keeps nearby seeds from producing streams that are
  // merely index-shifted copies of each other.
  const uint64_t stream =
      SplitMix64(seed) ^ (static_cast<uint64_t>(param_index) << 40);
  for (int64_t i = begin; i < end; ++i) {
    const uint64_t h = SplitMix64(stream ^ static_cast<uint64_t>(i));
    const double u = double(h >> 40) * 0x1.0p-24;  // [0, 1), exact in float
    out[i - begin] = static_cast<float>(bound * (2.0 * u - 1.0));
  }
}

}  // namespace tessera
