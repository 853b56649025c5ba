#include "server/optimizer.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numbers>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "proto/tessera.pb.h"

namespace tessera {
namespace {

using tessera::v1::OptimizerSpec;
using tessera::v1::OptimizerType;

OptimizerSpec MakeSpec(OptimizerType type, double lr) {
  OptimizerSpec spec;
  spec.set_type(type);
  spec.set_learning_rate(lr);
  return spec;
}

std::unique_ptr<Optimizer> MustCreate(const OptimizerSpec& spec) {
  absl::StatusOr<std::unique_ptr<Optimizer>> opt = Optimizer::Create(spec);
  EXPECT_TRUE(opt.ok()) << opt.status();
  return opt.ok() ? std::move(*opt) : nullptr;
}

// Parameters plus the optimizer's slots, with the slots initialised as the
// server would.
struct FloatState {
  FloatState(const Optimizer& opt, std::vector<float> initial)
      : params(std::move(initial)) {
    for (int k = 0; k < opt.num_slots(); ++k) {
      slots.emplace_back(params.size(), opt.SlotInitialValue(k));
    }
  }

  void Step(const Optimizer& opt, int64_t t, float lr,
            const std::vector<float>& grad) {
    std::vector<float*> ptrs;
    for (std::vector<float>& s : slots) ptrs.push_back(s.data());
    opt.Apply(t, lr, params.data(), grad.data(), ptrs.data(),
              static_cast<int64_t>(params.size()));
  }

  std::vector<float> params;
  std::vector<std::vector<float>> slots;
};

// A plain double-precision transcription of torch.optim's documented
// algorithms (SGD, Adam, AdamW, Adagrad), independent of the code under
// test: it applies its own defaults and follows PyTorch's first-step momentum
// buffer initialisation literally.
class Reference {
 public:
  Reference(const OptimizerSpec& spec, const std::vector<float>& initial)
      : spec_(spec), p_(initial.begin(), initial.end()) {
    const bool adam =
        spec.type() == tessera::v1::ADAM || spec.type() == tessera::v1::ADAMW;
    beta1_ = spec.beta1() != 0 ? spec.beta1() : 0.9;
    beta2_ = spec.beta2() != 0 ? spec.beta2() : 0.999;
    eps_ = spec.epsilon() != 0 ? spec.epsilon() : (adam ? 1e-8 : 1e-10);
    a_.assign(p_.size(), 0.0);
    b_.assign(p_.size(), 0.0);
    if (spec.type() == tessera::v1::ADAGRAD) {
      a_.assign(p_.size(), spec.initial_accumulator());
    }
  }

  void Step(int64_t t, double lr, const std::vector<float>& grad) {
    const double wd = spec_.weight_decay();
    for (size_t i = 0; i < p_.size(); ++i) {
      double g = grad[i];
      double& p = p_[i];
      switch (spec_.type()) {
        case tessera::v1::SGD:
          g += wd * p;
          p -= lr * g;
          break;
        case tessera::v1::MOMENTUM: {
          g += wd * p;
          const double mu = spec_.momentum();
          double& buf = a_[i];
          buf = (t == 1) ? g : mu * buf + g;
          const double d = spec_.nesterov() ? g + mu * buf : buf;
          p -= lr * d;
          break;
        }
        case tessera::v1::ADAM:
        case tessera::v1::ADAMW: {
          if (spec_.type() == tessera::v1::ADAMW) {
            p *= 1 - lr * wd;
          } else {
            g += wd * p;
          }
          double& m = a_[i];
          double& v = b_[i];
          m = beta1_ * m + (1 - beta1_) * g;
          v = beta2_ * v + (1 - beta2_) * g * g;
          const double bc1 = 1 - std::pow(beta1_, static_cast<double>(t));
          const double bc2 = 1 - std::pow(beta2_, static_cast<double>(t));
          const double denom = std::sqrt(v) / std::sqrt(bc2) + eps_;
          p -= (lr / bc1) * m / denom;
          break;
        }
        case tessera::v1::ADAGRAD: {
          g += wd * p;
          double& sum = a_[i];
          sum += g * g;
          p -= lr * g / (std::sqrt(sum) + eps_);
          break;
        }
        default:
          FAIL() << "no reference for type " << spec_.type();
      }
    }
  }

  const std::vector<double>& params() const { return p_; }
  // Slot k in the optimizer's layout.
  const std::vector<double>& slot(int k) const { return k == 0 ? a_ : b_; }

 private:
  OptimizerSpec spec_;
  double beta1_, beta2_, eps_;
  std::vector<double> p_;
  std::vector<double> a_;  // momentum buffer / first moment / accumulator
  std::vector<double> b_;  // second moment
};

// Magnitudes in [1, 2) with random signs so no parameter gets near zero
// within a few small steps and a relative comparison is meaningful.
std::vector<float> RandomParams(size_t n, std::mt19937* rng) {
  std::uniform_real_distribution<float> mag(1.0f, 2.0f);
  std::bernoulli_distribution neg(0.5);
  std::vector<float> out(n);
  for (float& x : out) x = neg(*rng) ? -mag(*rng) : mag(*rng);
  return out;
}

std::vector<float> RandomGrad(size_t n, std::mt19937* rng) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> out(n);
  for (float& x : out) x = dist(*rng);
  return out;
}

struct ReferenceCase {
  std::string name;
  OptimizerSpec spec;
};

std::vector<ReferenceCase> ReferenceCases() {
  std::vector<ReferenceCase> cases;
  auto add = [&](std::string name, OptimizerType type,
                 const std::function<void(OptimizerSpec*)>& tweak) {
    OptimizerSpec spec = MakeSpec(type, 0.01);
    tweak(&spec);
    cases.push_back({std::move(name), spec});
  };
  add("Sgd", tessera::v1::SGD, [](OptimizerSpec*) {});
  add("SgdWeightDecay", tessera::v1::SGD,
      [](OptimizerSpec* s) { s->set_weight_decay(0.05); });
  add("Momentum", tessera::v1::MOMENTUM,
      [](OptimizerSpec* s) { s->set_momentum(0.9); });
  add("MomentumZero", tessera::v1::MOMENTUM, [](OptimizerSpec*) {});
  add("NesterovWeightDecay", tessera::v1::MOMENTUM, [](OptimizerSpec* s) {
    s->set_momentum(0.8);
    s->set_nesterov(true);
    s->set_weight_decay(0.01);
  });
  add("AdamDefaults", tessera::v1::ADAM, [](OptimizerSpec*) {});
  add("AdamCustom", tessera::v1::ADAM, [](OptimizerSpec* s) {
    s->set_beta1(0.8);
    s->set_beta2(0.99);
    s->set_epsilon(1e-6);
    s->set_weight_decay(0.02);
  });
  add("AdamW", tessera::v1::ADAMW,
      [](OptimizerSpec* s) { s->set_weight_decay(0.1); });
  add("Adagrad", tessera::v1::ADAGRAD, [](OptimizerSpec* s) {
    s->set_initial_accumulator(0.1);
    s->set_weight_decay(0.01);
  });
  add("AdagradNoAccumulator", tessera::v1::ADAGRAD, [](OptimizerSpec*) {});
  // Large enough that where epsilon enters the denominator matters.
  add("AdagradLargeEpsilon", tessera::v1::ADAGRAD,
      [](OptimizerSpec* s) { s->set_epsilon(0.1); });
  return cases;
}

class MatchesReferenceTest : public testing::TestWithParam<ReferenceCase> {};

TEST_P(MatchesReferenceTest, TenStepsWithinRelativeError) {
  const OptimizerSpec& spec = GetParam().spec;
  std::unique_ptr<Optimizer> opt = MustCreate(spec);
  ASSERT_NE(opt, nullptr);
  constexpr size_t kN = 1037;  // not a multiple of any vector width
  std::mt19937 rng(12345);
  const std::vector<float> initial = RandomParams(kN, &rng);
  FloatState state(*opt, initial);
  Reference ref(spec, initial);
  for (int64_t t = 1; t <= 10; ++t) {
    // Vary the rate per step, as a schedule would.
    const float lr = static_cast<float>(spec.learning_rate()) *
                     (1.0f + 0.1f * static_cast<float>(t));
    const std::vector<float> grad = RandomGrad(kN, &rng);
    state.Step(*opt, t, lr, grad);
    ref.Step(t, lr, grad);
  }
  int bad = 0;
  for (size_t i = 0; i < kN; ++i) {
    const double want = ref.params()[i];
    const double err = std::abs(state.params[i] - want) / std::abs(want);
    if (err > 1e-5 && ++bad <= 5) {
      ADD_FAILURE() << "param " << i << ": got " << state.params[i] << ", want "
                    << want << " (relative error " << err << ")";
    }
  }
  EXPECT_EQ(bad, 0);
  // Slots are running sums of terms of either sign: one that has nearly
  // cancelled keeps the float rounding of its larger terms (and of beta1 in
  // float), so the relative error is taken against at least a tenth of the
  // slot's largest value. A wrong rule is still off by far more.
  for (int k = 0; k < opt->num_slots(); ++k) {
    double scale = 0;
    for (double x : ref.slot(k)) scale = std::max(scale, std::abs(x));
    int bad_slot = 0;
    for (size_t i = 0; i < kN; ++i) {
      const double want = ref.slot(k)[i];
      const double err = std::abs(state.slots[k][i] - want) /
                         std::max(std::abs(want), 0.1 * scale);
      if (err > 1e-5 && ++bad_slot <= 5) {
        ADD_FAILURE() << "slot " << k << "[" << i << "]: got "
                      << state.slots[k][i] << ", want " << want;
      }
    }
    EXPECT_EQ(bad_slot, 0) << "slot " << k;
  }
}

INSTANTIATE_TEST_SUITE_P(AllOptimizers, MatchesReferenceTest,
                         testing::ValuesIn(ReferenceCases()),
                         [](const testing::TestParamInfo<ReferenceCase>& info) {
                           return info.param.name;
                         });

// ---------------------------------------------------------------------------
// Hand-computed values. Inputs are chosen so every intermediate is exact in
// binary floating point, which makes exact equality the right check.

TEST(OptimizerTest, SgdExactValues) {
  std::unique_ptr<Optimizer> opt = MustCreate(MakeSpec(tessera::v1::SGD, 0.5));
  ASSERT_NE(opt, nullptr);
  EXPECT_EQ(opt->num_slots(), 0);
  std::vector<float> p = {1.0f, -2.0f, 0.5f};
  const std::vector<float> g = {0.5f, 1.0f, -4.0f};
  opt->Apply(1, 0.5f, p.data(), g.data(), nullptr, 3);
  EXPECT_EQ(p, (std::vector<float>{0.75f, -2.5f, 2.5f}));
}

TEST(OptimizerTest, SgdWeightDecayIsAddedToGradient) {
  OptimizerSpec spec = MakeSpec(tessera::v1::SGD, 0.5);
  spec.set_weight_decay(0.5);
  std::unique_ptr<Optimizer> opt = MustCreate(spec);
  ASSERT_NE(opt, nullptr);
  std::vector<float> p = {2.0f};
  const std::vector<float> g = {1.0f};
  // d = 1 + 0.5 * 2 = 2; p = 2 - 0.5 * 2.
  opt->Apply(1, 0.5f, p.data(), g.data(), nullptr, 1);
  EXPECT_EQ(p[0], 1.0f);
}

TEST(OptimizerTest, MomentumAndNesterovExactValues) {
  OptimizerSpec spec = MakeSpec(tessera::v1::MOMENTUM, 0.5);
  spec.set_momentum(0.5);
  std::unique_ptr<Optimizer> plain = MustCreate(spec);
  spec.set_nesterov(true);
  std::unique_ptr<Optimizer> nesterov = MustCreate(spec);
  ASSERT_NE(plain, nullptr);
  ASSERT_NE(nesterov, nullptr);
  ASSERT_EQ(plain->num_slots(), 1);
  ASSERT_EQ(nesterov->num_slots(), 1);

  const std::vector<float> g = {1.0f};
  FloatState a(*plain, {1.0f});
  FloatState b(*nesterov, {1.0f});
  // Plain: buf 1, p 0.5; buf 1.5, p -0.25.
  // Nesterov: buf 1, d 1.5, p 0.25; buf 1.5, d 1.75, p -0.625.
  a.Step(*plain, 1, 0.5f, g);
  b.Step(*nesterov, 1, 0.5f, g);
  EXPECT_EQ(a.params[0], 0.5f);
  EXPECT_EQ(b.params[0], 0.25f);
  a.Step(*plain, 2, 0.5f, g);
  b.Step(*nesterov, 2, 0.5f, g);
  EXPECT_EQ(a.params[0], -0.25f);
  EXPECT_EQ(a.slots[0][0], 1.5f);
  EXPECT_EQ(b.params[0], -0.625f);
  EXPECT_EQ(b.slots[0][0], 1.5f);
}

TEST(OptimizerTest, AdamFirstStepMovesByLearningRateTimesSign) {
  const double lr = 0.01;
  std::unique_ptr<Optimizer> opt = MustCreate(MakeSpec(tessera::v1::ADAM, lr));
  ASSERT_NE(opt, nullptr);
  ASSERT_EQ(opt->num_slots(), 2);
  // Bias correction makes m_hat = g and v_hat = g^2 after one step, whatever
  // the gradient's scale.
  const std::vector<float> p0 = {1.0f, -1.0f, 0.5f, 2.0f, -3.0f};
  const std::vector<float> g = {0.001f, -3.0f, 100.0f, -0.25f, 1e-5f};
  FloatState s(*opt, p0);
  s.Step(*opt, 1, static_cast<float>(lr), g);
  for (size_t i = 0; i < p0.size(); ++i) {
    const double gi = g[i];
    const double exact = p0[i] - lr * gi / (std::abs(gi) + 1e-8);
    EXPECT_NEAR(s.params[i], exact, 1e-6) << i;
    const double sign = gi > 0 ? 1.0 : -1.0;
    EXPECT_NEAR(s.params[i], p0[i] - lr * sign, lr * 2e-3) << i;
    EXPECT_FLOAT_EQ(s.slots[0][i], static_cast<float>(0.1 * gi)) << i;
    EXPECT_FLOAT_EQ(s.slots[1][i], static_cast<float>(0.001 * gi * gi)) << i;
  }
}

TEST(OptimizerTest, AdamWMatchesAdamExactlyWithoutWeightDecay) {
  std::mt19937 rng(7);
  const std::vector<float> p0 = RandomParams(100, &rng);
  std::vector<std::vector<float>> grads;
  for (int t = 0; t < 3; ++t) grads.push_back(RandomGrad(100, &rng));

  auto run = [&](OptimizerType type, double wd) {
    OptimizerSpec spec = MakeSpec(type, 0.01);
    spec.set_weight_decay(wd);
    std::unique_ptr<Optimizer> opt = MustCreate(spec);
    FloatState s(*opt, p0);
    for (int t = 0; t < 3; ++t) s.Step(*opt, t + 1, 0.01f, grads[t]);
    return s.params;
  };
  EXPECT_EQ(run(tessera::v1::ADAM, 0), run(tessera::v1::ADAMW, 0));
  const std::vector<float> adam = run(tessera::v1::ADAM, 0.1);
  const std::vector<float> adamw = run(tessera::v1::ADAMW, 0.1);
  int differing = 0;
  for (size_t i = 0; i < adam.size(); ++i) {
    differing += adam[i] != adamw[i];
  }
  EXPECT_GT(differing, 90);
}

TEST(OptimizerTest, AdamWFirstStepDecaysThenSteps) {
  OptimizerSpec spec = MakeSpec(tessera::v1::ADAMW, 0.01);
  spec.set_weight_decay(0.5);
  std::unique_ptr<Optimizer> opt = MustCreate(spec);
  ASSERT_NE(opt, nullptr);
  FloatState s(*opt, {2.0f});
  s.Step(*opt, 1, 0.01f, {4.0f});
  // 2 * (1 - 0.005) - 0.01 * 4 / (4 + 1e-8).
  EXPECT_NEAR(s.params[0], 1.99 - 0.01, 1e-6);
}

TEST(OptimizerTest, AdagradStartsFromInitialAccumulator) {
  OptimizerSpec spec = MakeSpec(tessera::v1::ADAGRAD, 0.5);
  spec.set_initial_accumulator(3.0);
  std::unique_ptr<Optimizer> opt = MustCreate(spec);
  ASSERT_NE(opt, nullptr);
  ASSERT_EQ(opt->num_slots(), 1);
  EXPECT_EQ(opt->SlotInitialValue(0), 3.0f);
  FloatState s(*opt, {1.0f});
  // sum = 3 + 1 = 4; p = 1 - 0.5 * 1 / (2 + 1e-10), and 1e-10 vanishes
  // against 2 in float.
  s.Step(*opt, 1, 0.5f, {1.0f});
  EXPECT_EQ(s.slots[0][0], 4.0f);
  EXPECT_EQ(s.params[0], 0.75f);

  std::unique_ptr<Optimizer> no_acc =
      MustCreate(MakeSpec(tessera::v1::ADAGRAD, 0.5));
  ASSERT_NE(no_acc, nullptr);
  EXPECT_EQ(no_acc->SlotInitialValue(0), 0.0f);
  FloatState z(*no_acc, {1.0f});
  z.Step(*no_acc, 1, 0.5f, {1.0f});
  EXPECT_EQ(z.params[0], 0.5f);
}

TEST(OptimizerTest, SlotCountsAndInitialValues) {
  struct Want {
    OptimizerType type;
    int slots;
  };
  for (const Want& w :
       {Want{tessera::v1::SGD, 0}, Want{tessera::v1::MOMENTUM, 1},
        Want{tessera::v1::ADAM, 2}, Want{tessera::v1::ADAMW, 2},
        Want{tessera::v1::ADAGRAD, 1}}) {
    OptimizerSpec spec = MakeSpec(w.type, 0.1);
    spec.set_initial_accumulator(0.25);
    std::unique_ptr<Optimizer> opt = MustCreate(spec);
    ASSERT_NE(opt, nullptr);
    EXPECT_EQ(opt->num_slots(), w.slots) << w.type;
    for (int k = 0; k < w.slots; ++k) {
      const float want = w.type == tessera::v1::ADAGRAD ? 0.25f : 0.0f;
      EXPECT_EQ(opt->SlotInitialValue(k), want) << w.type << " slot " << k;
    }
  }
}

TEST(OptimizerTest, DefaultsAreFilled) {
  std::unique_ptr<Optimizer> adam =
      MustCreate(MakeSpec(tessera::v1::ADAM, 0.1));
  ASSERT_NE(adam, nullptr);
  EXPECT_EQ(adam->spec().beta1(), 0.9);
  EXPECT_EQ(adam->spec().beta2(), 0.999);
  EXPECT_EQ(adam->spec().epsilon(), 1e-8);

  std::unique_ptr<Optimizer> adagrad =
      MustCreate(MakeSpec(tessera::v1::ADAGRAD, 0.1));
  ASSERT_NE(adagrad, nullptr);
  EXPECT_EQ(adagrad->spec().epsilon(), 1e-10);

  OptimizerSpec custom = MakeSpec(tessera::v1::ADAMW, 0.1);
  custom.set_beta1(0.5);
  custom.set_beta2(0.75);
  custom.set_epsilon(1e-3);
  std::unique_ptr<Optimizer> adamw = MustCreate(custom);
  ASSERT_NE(adamw, nullptr);
  EXPECT_EQ(adamw->spec().beta1(), 0.5);
  EXPECT_EQ(adamw->spec().beta2(), 0.75);
  EXPECT_EQ(adamw->spec().epsilon(), 1e-3);
}

// Summing k gradients of exactly 1 with rate 1 involves only exact integer
// arithmetic, so any lost or doubled update shows up as an exact mismatch.
TEST(OptimizerTest, SgdExactSumOverManySteps) {
  std::unique_ptr<Optimizer> opt = MustCreate(MakeSpec(tessera::v1::SGD, 1.0));
  ASSERT_NE(opt, nullptr);
  constexpr int64_t kN = 1001;
  constexpr int kSteps = 1000;
  std::vector<float> p0(kN);
  for (int64_t i = 0; i < kN; ++i) {
    p0[i] = static_cast<float>(i - 500) * 0.5f;
  }
  std::vector<float> p = p0;
  const std::vector<float> ones(kN, 1.0f);
  for (int k = 1; k <= kSteps; ++k) {
    opt->Apply(k, 1.0f, p.data(), ones.data(), nullptr, kN);
  }
  for (int64_t i = 0; i < kN; ++i) {
    ASSERT_EQ(p[i], p0[i] - static_cast<float>(kSteps)) << i;
  }
}

TEST(OptimizerTest, ApplyWithNoElementsTouchesNothing) {
  std::unique_ptr<Optimizer> opt = MustCreate(MakeSpec(tessera::v1::ADAM, 0.1));
  ASSERT_NE(opt, nullptr);
  float p = 1.0f, g = 1.0f, m = 0.0f, v = 0.0f;
  float* slots[] = {&m, &v};
  opt->Apply(1, 0.1f, &p, &g, slots, 0);
  EXPECT_EQ(p, 1.0f);
  EXPECT_EQ(m, 0.0f);
  EXPECT_EQ(v, 0.0f);
}

// ---------------------------------------------------------------------------
// Odd lengths and misaligned buffers.

// Heap storage aligned to 64 bytes, so offsets from it are known exactly.
class AlignedBuffer {
 public:
  explicit AlignedBuffer(size_t floats)
      : data_(static_cast<float*>(std::aligned_alloc(
            64, ((floats * sizeof(float) + 63) / 64) * 64))) {}
  ~AlignedBuffer() { std::free(data_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  float* data() { return data_; }

 private:
  float* data_;
};

struct LayoutCase {
  std::string name;
  OptimizerSpec spec;
  int64_t n;
};

std::vector<LayoutCase> LayoutCases() {
  std::vector<LayoutCase> cases;
  for (const ReferenceCase& rc : ReferenceCases()) {
    for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{1000003}}) {
      cases.push_back({absl::StrCat(rc.name, "_n", n), rc.spec, n});
    }
  }
  return cases;
}

class LayoutTest : public testing::TestWithParam<LayoutCase> {};

// Runs three updates on buffers at the given float offsets from 64-byte
// boundaries and returns the parameters followed by every slot.
std::vector<float> RunAtOffsets(const Optimizer& opt, int64_t n,
                                int param_offset, int grad_offset,
                                int slot_offset) {
  constexpr int kPad = 16;
  AlignedBuffer p_buf(n + kPad), g_buf(n + kPad);
  std::vector<std::unique_ptr<AlignedBuffer>> slot_bufs;
  std::vector<float*> slots;
  for (int k = 0; k < opt.num_slots(); ++k) {
    slot_bufs.push_back(std::make_unique<AlignedBuffer>(n + kPad));
    slots.push_back(slot_bufs.back()->data() + slot_offset);
    std::fill_n(slots.back(), n, opt.SlotInitialValue(k));
  }
  float* p = p_buf.data() + param_offset;
  float* g = g_buf.data() + grad_offset;
  std::mt19937 rng(99);
  const std::vector<float> p0 = RandomParams(n, &rng);
  std::copy(p0.begin(), p0.end(), p);
  for (int t = 1; t <= 3; ++t) {
    const std::vector<float> grad = RandomGrad(n, &rng);
    std::copy(grad.begin(), grad.end(), g);
    opt.Apply(t, 0.01f, p, g, slots.data(), n);
  }
  std::vector<float> out(p, p + n);
  for (float* s : slots) out.insert(out.end(), s, s + n);
  return out;
}

// The kernels may take a scalar path for a misaligned head or an odd tail and
// a vector path elsewhere; with fused multiply-add contraction those can
// round differently, so equality is to within 2 ulps rather than bitwise.
void ExpectWithinUlps(const std::vector<float>& got,
                      const std::vector<float>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const float tol =
        2 * (std::nextafter(std::abs(want[i]), INFINITY) - std::abs(want[i]));
    if (!(std::abs(got[i] - want[i]) <= tol) && ++bad <= 5) {
      ADD_FAILURE() << what << " element " << i << ": got " << got[i]
                    << ", want " << want[i];
    }
  }
  EXPECT_EQ(bad, 0) << what;
}

TEST_P(LayoutTest, MisalignedMatchesAligned) {
  std::unique_ptr<Optimizer> opt = MustCreate(GetParam().spec);
  ASSERT_NE(opt, nullptr);
  const int64_t n = GetParam().n;
  const std::vector<float> aligned = RunAtOffsets(*opt, n, 0, 0, 0);
  ExpectWithinUlps(RunAtOffsets(*opt, n, 1, 1, 1), aligned, "offset 1");
  ExpectWithinUlps(RunAtOffsets(*opt, n, 1, 3, 2), aligned, "mixed offsets");
}

INSTANTIATE_TEST_SUITE_P(AllOptimizers, LayoutTest,
                         testing::ValuesIn(LayoutCases()),
                         [](const testing::TestParamInfo<LayoutCase>& info) {
                           return info.param.name;
                         });

// Apply is const and documented as safe on different blocks concurrently.
TEST(OptimizerTest, ConcurrentApplyOnDisjointBlocksMatchesSequential) {
  std::unique_ptr<Optimizer> opt =
      MustCreate(MakeSpec(tessera::v1::ADAM, 0.01));
  ASSERT_NE(opt, nullptr);
  constexpr int kBlocks = 4;
  constexpr size_t kN = 4099;
  std::mt19937 rng(3);
  std::vector<std::vector<float>> p0, grads;
  for (int b = 0; b < kBlocks; ++b) {
    p0.push_back(RandomParams(kN, &rng));
    grads.push_back(RandomGrad(kN, &rng));
  }
  std::vector<FloatState> sequential, concurrent;
  for (int b = 0; b < kBlocks; ++b) {
    sequential.emplace_back(*opt, p0[b]);
    concurrent.emplace_back(*opt, p0[b]);
    sequential[b].Step(*opt, 1, 0.01f, grads[b]);
  }
  std::vector<std::thread> threads;
  for (int b = 0; b < kBlocks; ++b) {
    threads.emplace_back(
        [&, b] { concurrent[b].Step(*opt, 1, 0.01f, grads[b]); });
  }
  for (std::thread& t : threads) t.join();
  for (int b = 0; b < kBlocks; ++b) {
    EXPECT_EQ(concurrent[b].params, sequential[b].params) << b;
    EXPECT_EQ(concurrent[b].slots, sequential[b].slots) << b;
  }
}

// ---------------------------------------------------------------------------
// Learning-rate schedule.

TEST(LearningRateTest, LinearWarmupThenConstant) {
  OptimizerSpec spec = MakeSpec(tessera::v1::SGD, 0.1);
  spec.set_warmup_steps(4);
  std::unique_ptr<Optimizer> opt = MustCreate(spec);
  ASSERT_NE(opt, nullptr);
  EXPECT_DOUBLE_EQ(opt->LearningRate(0), 0.025);
  EXPECT_DOUBLE_EQ(opt->LearningRate(1), 0.05);
  EXPECT_DOUBLE_EQ(opt->LearningRate(2), 0.075);
  EXPECT_DOUBLE_EQ(opt->LearningRate(3), 0.1);
  EXPECT_DOUBLE_EQ(opt->LearningRate(4), 0.1);
  EXPECT_DOUBLE_EQ(opt->LearningRate(1000000), 0.1);
  EXPECT_DOUBLE_EQ(opt->LearningRate(-5), 0.025);
}

TEST(LearningRateTest, ConstantWithoutWarmup) {
  std::unique_ptr<Optimizer> opt = MustCreate(MakeSpec(tessera::v1::SGD, 0.3));
  ASSERT_NE(opt, nullptr);
  EXPECT_DOUBLE_EQ(opt->LearningRate(0), 0.3);
  EXPECT_DOUBLE_EQ(opt->LearningRate(12345), 0.3);
}

TEST(LearningRateTest, StepBoundaries) {
  OptimizerSpec spec = MakeSpec(tessera::v1::SGD, 0.1);
  spec.set_schedule(tessera::v1::STEP);
  spec.set_decay_steps(100);
  spec.set_decay_rate(0.5);
  std::unique_ptr<Optimizer> opt = MustCreate(spec);
  ASSERT_NE(opt, nullptr);
  EXPECT_DOUBLE_EQ(opt->LearningRate(0), 0.1);
  EXPECT_DOUBLE_EQ(opt->LearningRate(99), 0.1);
  EXPECT_DOUBLE_EQ(opt->LearningRate(100), 0.05);
  EXPECT_DOUBLE_EQ(opt->LearningRate(199), 0.05);
  EXPECT_DOUBLE_EQ(opt->LearningRate(200), 0.025);
  EXPECT_DOUBLE_EQ(opt->LearningRate(250), 0.025);
}

TEST(LearningRateTest, StepIsMeasuredFromEndOfWarmup) {
  OptimizerSpec spec = MakeSpec(tessera::v1::SGD, 0.1);
  spec.set_warmup_steps(10);
  spec.set_schedule(tessera::v1::STEP);
  spec.set_decay_steps(100);
  spec.set_decay_rate(0.1);
  std::unique_ptr<Optimizer> opt = MustCreate(spec);
  ASSERT_NE(opt, nullptr);
  EXPECT_DOUBLE_EQ(opt->LearningRate(4), 0.05);
  EXPECT_DOUBLE_EQ(opt->LearningRate(10), 0.1);
  EXPECT_DOUBLE_EQ(opt->LearningRate(109), 0.1);
  EXPECT_DOUBLE_EQ(opt->LearningRate(110), 0.1 * 0.1);
  EXPECT_DOUBLE_EQ(opt->LearningRate(310), 0.1 * 0.1 * 0.1 * 0.1);
}

TEST(LearningRateTest, CosineMidpointAndEnd) {
  OptimizerSpec spec = MakeSpec(tessera::v1::SGD, 1.0);
  spec.set_schedule(tessera::v1::COSINE);
  spec.set_decay_steps(100);
  spec.set_min_learning_rate(0.1);
  std::unique_ptr<Optimizer> opt = MustCreate(spec);
  ASSERT_NE(opt, nullptr);
  EXPECT_DOUBLE_EQ(opt->LearningRate(0), 1.0);
  EXPECT_NEAR(opt->LearningRate(50), 0.55, 1e-12);
  EXPECT_NEAR(opt->LearningRate(25),
              0.1 + 0.9 * 0.5 * (1 + std::cos(std::numbers::pi / 4)), 1e-12);
  EXPECT_DOUBLE_EQ(opt->LearningRate(100), 0.1);
  EXPECT_DOUBLE_EQ(opt->LearningRate(5000), 0.1);
}

TEST(LearningRateTest, CosineAfterWarmupDefaultsToZeroFloor) {
  OptimizerSpec spec = MakeSpec(tessera::v1::ADAM, 0.2);
  spec.set_warmup_steps(10);
  spec.set_schedule(tessera::v1::COSINE);
  spec.set_decay_steps(20);
  std::unique_ptr<Optimizer> opt = MustCreate(spec);
  ASSERT_NE(opt, nullptr);
  EXPECT_DOUBLE_EQ(opt->LearningRate(9), 0.2);
  EXPECT_DOUBLE_EQ(opt->LearningRate(10), 0.2);
  EXPECT_NEAR(opt->LearningRate(20), 0.1, 1e-12);
  EXPECT_NEAR(opt->LearningRate(30), 0.0, 1e-15);
  EXPECT_NEAR(opt->LearningRate(31), 0.0, 1e-15);
}

// ---------------------------------------------------------------------------
// Validation.

struct InvalidCase {
  std::string name;
  std::function<void(OptimizerSpec*)> mutate;
  std::string field;  // expected in the message, as "optimizer.<field>:"
};

std::vector<InvalidCase> InvalidCases() {
  const double nan = std::nan("");
  const double inf = INFINITY;
  return {
      {"TypeUnspecified",
       [](OptimizerSpec* s) {
         s->set_type(tessera::v1::OPTIMIZER_TYPE_UNSPECIFIED);
       },
       "type"},
      {"TypeUnknown",
       [](OptimizerSpec* s) { s->set_type(static_cast<OptimizerType>(42)); },
       "type"},
      {"LearningRateZero", [](OptimizerSpec* s) { s->set_learning_rate(0); },
       "learning_rate"},
      {"LearningRateNegative",
       [](OptimizerSpec* s) { s->set_learning_rate(-1); }, "learning_rate"},
      {"LearningRateNan", [=](OptimizerSpec* s) { s->set_learning_rate(nan); },
       "learning_rate"},
      {"LearningRateInf", [=](OptimizerSpec* s) { s->set_learning_rate(inf); },
       "learning_rate"},
      {"MomentumNegative", [](OptimizerSpec* s) { s->set_momentum(-0.1); },
       "momentum"},
      {"MomentumOne", [](OptimizerSpec* s) { s->set_momentum(1.0); },
       "momentum"},
      {"MomentumNan", [=](OptimizerSpec* s) { s->set_momentum(nan); },
       "momentum"},
      {"Beta1One", [](OptimizerSpec* s) { s->set_beta1(1.0); }, "beta1"},
      {"Beta1Negative", [](OptimizerSpec* s) { s->set_beta1(-0.5); }, "beta1"},
      {"Beta2AboveOne", [](OptimizerSpec* s) { s->set_beta2(1.5); }, "beta2"},
      {"Beta2Nan", [=](OptimizerSpec* s) { s->set_beta2(nan); }, "beta2"},
      {"EpsilonNegative", [](OptimizerSpec* s) { s->set_epsilon(-1e-8); },
       "epsilon"},
      {"EpsilonInf", [=](OptimizerSpec* s) { s->set_epsilon(inf); }, "epsilon"},
      {"WeightDecayNegative",
       [](OptimizerSpec* s) { s->set_weight_decay(-0.1); }, "weight_decay"},
      {"WeightDecayNan", [=](OptimizerSpec* s) { s->set_weight_decay(nan); },
       "weight_decay"},
      {"InitialAccumulatorNegative",
       [](OptimizerSpec* s) {
         s->set_type(tessera::v1::ADAGRAD);
         s->set_initial_accumulator(-1);
       },
       "initial_accumulator"},
      {"WarmupNegative", [](OptimizerSpec* s) { s->set_warmup_steps(-1); },
       "warmup_steps"},
      {"DecayStepsNegative", [](OptimizerSpec* s) { s->set_decay_steps(-1); },
       "decay_steps"},
      {"StepWithoutDecaySteps",
       [](OptimizerSpec* s) {
         s->set_schedule(tessera::v1::STEP);
         s->set_decay_rate(0.5);
       },
       "decay_steps"},
      {"StepDecayRateZero",
       [](OptimizerSpec* s) {
         s->set_schedule(tessera::v1::STEP);
         s->set_decay_steps(10);
       },
       "decay_rate"},
      {"StepDecayRateAboveOne",
       [](OptimizerSpec* s) {
         s->set_schedule(tessera::v1::STEP);
         s->set_decay_steps(10);
         s->set_decay_rate(1.5);
       },
       "decay_rate"},
      {"StepDecayRateNan",
       [=](OptimizerSpec* s) {
         s->set_schedule(tessera::v1::STEP);
         s->set_decay_steps(10);
         s->set_decay_rate(nan);
       },
       "decay_rate"},
      {"CosineWithoutDecaySteps",
       [](OptimizerSpec* s) { s->set_schedule(tessera::v1::COSINE); },
       "decay_steps"},
      {"ScheduleUnknown",
       [](OptimizerSpec* s) {
         s->set_schedule(static_cast<tessera::v1::Schedule>(17));
       },
       "schedule"},
      {"MinLearningRateNegative",
       [](OptimizerSpec* s) { s->set_min_learning_rate(-0.001); },
       "min_learning_rate"},
      {"MinLearningRateAboveLearningRate",
       [](OptimizerSpec* s) { s->set_min_learning_rate(0.5); },
       "min_learning_rate"},
  };
}

class InvalidSpecTest : public testing::TestWithParam<InvalidCase> {};

TEST_P(InvalidSpecTest, RejectedNamingTheField) {
  OptimizerSpec spec = MakeSpec(tessera::v1::ADAM, 0.1);
  GetParam().mutate(&spec);
  absl::StatusOr<std::unique_ptr<Optimizer>> opt = Optimizer::Create(spec);
  ASSERT_FALSE(opt.ok());
  EXPECT_EQ(opt.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(opt.status().message().find(
                absl::StrCat("optimizer.", GetParam().field, ":")),
            absl::string_view::npos)
      << opt.status();
}

INSTANTIATE_TEST_SUITE_P(AllFields, InvalidSpecTest,
                         testing::ValuesIn(InvalidCases()),
                         [](const testing::TestParamInfo<InvalidCase>& info) {
                           return info.param.name;
                         });

TEST(ValidationTest, MessageShowsTheBadValue) {
  absl::StatusOr<std::unique_ptr<Optimizer>> opt =
      Optimizer::Create(MakeSpec(tessera::v1::SGD, -1));
  ASSERT_FALSE(opt.ok());
  EXPECT_EQ(opt.status().message(),
            "optimizer.learning_rate: must be positive and finite, got -1");
}

TEST(ValidationTest, BoundaryValuesAreAccepted) {
  OptimizerSpec step = MakeSpec(tessera::v1::MOMENTUM, 0.1);
  step.set_momentum(0);
  step.set_schedule(tessera::v1::STEP);
  step.set_decay_steps(1);
  step.set_decay_rate(1.0);
  step.set_min_learning_rate(0.1);  // equal to learning_rate
  EXPECT_TRUE(Optimizer::Create(step).ok());

  OptimizerSpec cosine = MakeSpec(tessera::v1::ADAGRAD, 0.1);
  cosine.set_schedule(tessera::v1::COSINE);
  cosine.set_decay_steps(1);
  cosine.set_warmup_steps(0);
  cosine.set_initial_accumulator(0);
  EXPECT_TRUE(Optimizer::Create(cosine).ok());
}

}  // namespace
}  // namespace tessera
