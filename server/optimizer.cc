#include "server/optimizer.h"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numbers>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace tessera {
namespace {

using tessera::v1::OptimizerSpec;

// Unaligned maps so any caller buffer works; on x86-64-v3 unaligned loads of
// aligned data cost the same as aligned ones.
using ArrayMap = Eigen::Map<Eigen::ArrayXf, Eigen::Unaligned>;
using ConstArrayMap = Eigen::Map<const Eigen::ArrayXf, Eigen::Unaligned>;

// Rules with state are written as several Eigen statements (slots first, then
// the parameters). Running them over L1-sized chunks keeps the later
// statements' re-reads in cache, so main memory sees a single pass. 1024
// floats x 4 arrays (Adam) = 16 KiB, well inside a 32 KiB L1D.
constexpr int64_t kChunk = 1024;

constexpr double kDefaultBeta1 = 0.9;
constexpr double kDefaultBeta2 = 0.999;
constexpr double kDefaultAdamEpsilon = 1e-8;
constexpr double kDefaultAdagradEpsilon = 1e-10;

template <typename ChunkFn>
void ForEachChunk(int64_t n, ChunkFn&& fn) {
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    fn(begin, std::min(kChunk, n - begin));
  }
}

absl::Status FieldError(absl::string_view field, absl::string_view what,
                        double value) {
  return absl::InvalidArgumentError(
      absl::StrCat("optimizer.", field, ": ", what, ", got ", value));
}

// `!(x >= 0)` rather than `x < 0` so NaN is rejected too.
absl::Status CheckNonNegativeFinite(absl::string_view field, double value) {
  if (!(value >= 0) || !std::isfinite(value)) {
    return FieldError(field, "must be non-negative and finite", value);
  }
  return absl::OkStatus();
}

absl::Status CheckUnitInterval(absl::string_view field, double value) {
  if (!(value >= 0 && value < 1)) {
    return FieldError(field, "must be in [0, 1)", value);
  }
  return absl::OkStatus();
}

int NumSlotsFor(tessera::v1::OptimizerType type) {
  switch (type) {
    case tessera::v1::MOMENTUM:
    case tessera::v1::ADAGRAD:
      return 1;
    case tessera::v1::ADAM:
    case tessera::v1::ADAMW:
      return 2;
    default:
      return 0;
  }
}

// Validates and fills defaults in place; see Optimizer::Create.
absl::Status ValidateAndFill(OptimizerSpec* spec) {
  const tessera::v1::OptimizerType type = spec->type();
  if (type == tessera::v1::OPTIMIZER_TYPE_UNSPECIFIED) {
    return absl::InvalidArgumentError(
        "optimizer.type: must be set to SGD, MOMENTUM, ADAM, ADAMW or "
        "ADAGRAD");
  }
  // proto3 enums are open: a newer peer's value parses but is not known here.
  if (!tessera::v1::OptimizerType_IsValid(type)) {
    return absl::InvalidArgumentError(
        absl::StrCat("optimizer.type: unknown value ", type));
  }
  if (!tessera::v1::Schedule_IsValid(spec->schedule())) {
    return absl::InvalidArgumentError(
        absl::StrCat("optimizer.schedule: unknown value ", spec->schedule()));
  }

  const double lr = spec->learning_rate();
  if (!(lr > 0) || !std::isfinite(lr)) {
    return FieldError("learning_rate", "must be positive and finite", lr);
  }
  if (absl::Status s = CheckUnitInterval("momentum", spec->momentum());
      !s.ok()) {
    return s;
  }

  const bool is_adam = type == tessera::v1::ADAM || type == tessera::v1::ADAMW;
  if (is_adam) {
    if (spec->beta1() == 0) spec->set_beta1(kDefaultBeta1);
    if (spec->beta2() == 0) spec->set_beta2(kDefaultBeta2);
    if (spec->epsilon() == 0) spec->set_epsilon(kDefaultAdamEpsilon);
  } else if (type == tessera::v1::ADAGRAD) {
    if (spec->epsilon() == 0) spec->set_epsilon(kDefaultAdagradEpsilon);
  }
  if (absl::Status s = CheckUnitInterval("beta1", spec->beta1()); !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckUnitInterval("beta2", spec->beta2()); !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckNonNegativeFinite("epsilon", spec->epsilon());
      !s.ok()) {
    return s;
  }
  if (absl::Status s =
          CheckNonNegativeFinite("weight_decay", spec->weight_decay());
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckNonNegativeFinite("initial_accumulator",
                                              spec->initial_accumulator());
      !s.ok()) {
    return s;
  }
  if (spec->warmup_steps() < 0) {
    return FieldError("warmup_steps", "must be non-negative",
                      static_cast<double>(spec->warmup_steps()));
  }
  if (spec->decay_steps() < 0) {
    return FieldError("decay_steps", "must be non-negative",
                      static_cast<double>(spec->decay_steps()));
  }

  switch (spec->schedule()) {
    case tessera::v1::STEP:
      if (spec->decay_steps() <= 0) {
        return FieldError("decay_steps",
                          "must be positive for the STEP schedule",
                          static_cast<double>(spec->decay_steps()));
      }
      if (!(spec->decay_rate() > 0 && spec->decay_rate() <= 1)) {
        return FieldError("decay_rate",
                          "must be in (0, 1] for the STEP schedule",
                          spec->decay_rate());
      }
      break;
    case tessera::v1::COSINE:
      if (spec->decay_steps() <= 0) {
        return FieldError("decay_steps",
                          "must be positive for the COSINE schedule",
                          static_cast<double>(spec->decay_steps()));
      }
      break;
    default:
      break;
  }

  const double min_lr = spec->min_learning_rate();
  if (!(min_lr >= 0 && min_lr <= lr)) {
    return FieldError("min_learning_rate",
                      absl::StrCat("must be in [0, learning_rate = ", lr, "]"),
                      min_lr);
  }
  return absl::OkStatus();
}

// The kernels below take the effective gradient as an Eigen expression so
// L2 weight decay (g + wd * p) is fused into the same pass instead of being
// materialised; without weight decay the plain gradient map is passed and the
// extra multiply-add disappears.
template <typename Body>
void WithEffectiveGradient(float weight_decay, const ConstArrayMap& g,
                           const ArrayMap& p, Body&& body) {
  if (weight_decay != 0.0f) {
    body(g + weight_decay * p);
  } else {
    body(g);
  }
}

void ApplySgd(float lr, float weight_decay, float* params, const float* grad,
              int64_t n) {
  ArrayMap p(params, n);
  ConstArrayMap g(grad, n);
  // One statement, already a single pass; no chunking needed.
  WithEffectiveGradient(weight_decay, g, p,
                        [&](const auto& ge) { p -= lr * ge; });
}

void ApplyMomentum(float lr, float weight_decay, float momentum, bool nesterov,
                   float* params, const float* grad, float* buf_data,
                   int64_t n) {
  ForEachChunk(n, [&](int64_t begin, int64_t len) {
    ArrayMap p(params + begin, len);
    ConstArrayMap g(grad + begin, len);
    ArrayMap buf(buf_data + begin, len);
    WithEffectiveGradient(weight_decay, g, p, [&](const auto& ge) {
      // A zero-initialised buffer makes the first step buf = g, matching
      // PyTorch's clone of the first gradient.
      buf = momentum * buf + ge;
      if (nesterov) {
        p -= lr * (ge + momentum * buf);
      } else {
        p -= lr * buf;
      }
    });
  });
}

struct AdamConstants {
  float beta1;
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float step_size;     // lr / (1 - beta1^t)
  float inv_sqrt_bc2;  // 1 / sqrt(1 - beta2^t)
  float epsilon;
  float l2;               // weight decay added to the gradient (ADAM)
  float decoupled_scale;  // 1 - lr * weight_decay (ADAMW), else 1
};

void ApplyAdam(const AdamConstants& c, float* params, const float* grad,
               float* m_data, float* v_data, int64_t n) {
  ForEachChunk(n, [&](int64_t begin, int64_t len) {
    ArrayMap p(params + begin, len);
    ConstArrayMap g(grad + begin, len);
    ArrayMap m(m_data + begin, len);
    ArrayMap v(v_data + begin, len);
    if (c.decoupled_scale != 1.0f) p *= c.decoupled_scale;
    WithEffectiveGradient(c.l2, g, p, [&](const auto& ge) {
      m = c.beta1 * m + c.one_minus_beta1 * ge;
      v = c.beta2 * v + c.one_minus_beta2 * ge.square();
      p -= c.step_size * m / (v.sqrt() * c.inv_sqrt_bc2 + c.epsilon);
    });
  });
}

void ApplyAdagrad(float lr, float weight_decay, float epsilon, float* params,
                  const float* grad, float* sum_data, int64_t n) {
  ForEachChunk(n, [&](int64_t begin, int64_t len) {
    ArrayMap p(params + begin, len);
    ConstArrayMap g(grad + begin, len);
    ArrayMap sum(sum_data + begin, len);
    WithEffectiveGradient(weight_decay, g, p, [&](const auto& ge) {
      sum += ge.square();
      p -= lr * ge / (sum.sqrt() + epsilon);
    });
  });
}

}  // namespace

absl::StatusOr<std::unique_ptr<Optimizer>> Optimizer::Create(
    const OptimizerSpec& spec) {
  OptimizerSpec filled = spec;
  if (absl::Status s = ValidateAndFill(&filled); !s.ok()) return s;
  return std::unique_ptr<Optimizer>(new Optimizer(filled));
}

Optimizer::Optimizer(const OptimizerSpec& spec)
    : spec_(spec), num_slots_(NumSlotsFor(spec.type())) {}

float Optimizer::SlotInitialValue(int k) const {
  if (spec_.type() == tessera::v1::ADAGRAD && k == 0) {
    return static_cast<float>(spec_.initial_accumulator());
  }
  return 0.0f;
}

double Optimizer::LearningRate(int64_t global_step) const {
  const double lr = spec_.learning_rate();
  const int64_t step = std::max<int64_t>(global_step, 0);
  const int64_t warmup = spec_.warmup_steps();
  if (step < warmup) {
    return lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  }
  const int64_t s = step - warmup;
  switch (spec_.schedule()) {
    case tessera::v1::STEP:
      return lr * std::pow(spec_.decay_rate(),
                           static_cast<double>(s / spec_.decay_steps()));
    case tessera::v1::COSINE: {
      const double min_lr = spec_.min_learning_rate();
      const double total = static_cast<double>(spec_.decay_steps());
      const double progress =
          static_cast<double>(std::min<int64_t>(s, spec_.decay_steps())) /
          total;
      return min_lr + (lr - min_lr) * 0.5 *
                          (1.0 + std::cos(std::numbers::pi * progress));
    }
    default:
      return lr;
  }
}

void Optimizer::Apply(int64_t update_count, float lr, float* params,
                      const float* grad, float* const* slots, int64_t n) const {
  if (n <= 0) return;
  const float weight_decay = static_cast<float>(spec_.weight_decay());
  switch (spec_.type()) {
    case tessera::v1::SGD:
      ApplySgd(lr, weight_decay, params, grad, n);
      return;
    case tessera::v1::MOMENTUM:
      ApplyMomentum(lr, weight_decay, static_cast<float>(spec_.momentum()),
                    spec_.nesterov(), params, grad, slots[0], n);
      return;
    case tessera::v1::ADAM:
    case tessera::v1::ADAMW: {
      // Scalars are computed in double, once per call, as PyTorch does on the
      // host; only the element-wise work is in float.
      const double t = static_cast<double>(std::max<int64_t>(update_count, 1));
      const double beta1 = spec_.beta1();
      const double beta2 = spec_.beta2();
      const double bc1 = 1.0 - std::pow(beta1, t);
      const double bc2 = 1.0 - std::pow(beta2, t);
      const bool decoupled = spec_.type() == tessera::v1::ADAMW;
      AdamConstants c;
      c.beta1 = static_cast<float>(beta1);
      c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
      c.beta2 = static_cast<float>(beta2);
      c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
      c.step_size = static_cast<float>(static_cast<double>(lr) / bc1);
      c.inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
      c.epsilon = static_cast<float>(spec_.epsilon());
      c.l2 = decoupled ? 0.0f : weight_decay;
      c.decoupled_scale =
          decoupled ? static_cast<float>(1.0 - static_cast<double>(lr) *
                                                   spec_.weight_decay())
                    : 1.0f;
      ApplyAdam(c, params, grad, slots[0], slots[1], n);
      return;
    }
    case tessera::v1::ADAGRAD:
      ApplyAdagrad(lr, weight_decay, static_cast<float>(spec_.epsilon()),
                   params, grad, slots[0], n);
      return;
    default:
      // Create() admits only the types above.
      return;
  }
}

}  // namespace tessera
