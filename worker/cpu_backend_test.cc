#include "worker/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "common/model_spec.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

// Uniform in [lo, hi) from the raw mt19937 stream, so values do not depend
// on the standard library's distribution implementations.
class Uniform {
 public:
  explicit Uniform(uint32_t seed) : rng_(seed) {}
  float operator()(float lo, float hi) {
    return lo + (hi - lo) * static_cast<float>(rng_() >> 8) * 0x1.0p-24f;
  }
  int32_t Below(int32_t n) { return static_cast<int32_t>(rng_() % n); }

 private:
  std::mt19937 rng_;
};

std::unique_ptr<GradientBackend> MakeBackend(const ModelSpec& model,
                                             int64_t max_batch) {
  absl::StatusOr<std::unique_ptr<GradientBackend>> backend =
      CreateCpuBackend(model, max_batch);
  EXPECT_TRUE(backend.ok()) << backend.status();
  return backend.ok() ? std::move(*backend) : nullptr;
}

ModelSpec Parse(const std::string& spec, LossKind loss) {
  absl::StatusOr<ModelSpec> model = ParseModelSpec(spec, loss);
  EXPECT_TRUE(model.ok()) << model.status();
  return *model;
}

// A random batch for `model` with its own storage.
struct OwnedBatch {
  std::vector<float> features;
  std::vector<int32_t> labels;
  std::vector<float> targets;
  Batch batch;
};

OwnedBatch RandomBatch(const ModelSpec& model, int64_t rows, Uniform& rand) {
  OwnedBatch b;
  b.features.resize(rows * model.input_dim());
  for (float& x : b.features) x = rand(-2.0f, 2.0f);
  b.batch.features = b.features.data();
  b.batch.rows = rows;
  if (model.loss == LossKind::kSoftmaxCrossEntropy) {
    for (int64_t r = 0; r < rows; ++r) {
      b.labels.push_back(rand.Below(static_cast<int32_t>(model.output_dim())));
    }
    b.batch.labels = b.labels.data();
  } else {
    b.targets.resize(rows * model.output_dim());
    for (float& t : b.targets) t = rand(-1.5f, 1.5f);
    b.batch.targets = b.targets.data();
  }
  return b;
}

std::vector<float> RandomParams(const ModelSpec& model, Uniform& rand) {
  std::vector<float> params(model.total_params());
  for (float& p : params) p = rand(-1.0f, 1.0f);
  return params;
}

double MeanLoss(GradientBackend& backend, const std::vector<float>& params,
                const Batch& batch) {
  absl::StatusOr<EvalResult> eval = backend.Evaluate(params, batch);
  EXPECT_TRUE(eval.ok()) << eval.status();
  return eval->loss_sum / eval->count;
}

// Compares every analytic gradient with a central finite difference.
void CheckGradients(const std::string& spec, LossKind loss, int64_t rows,
                    uint32_t seed) {
  SCOPED_TRACE(spec);
  const ModelSpec model = Parse(spec, loss);
  std::unique_ptr<GradientBackend> backend = MakeBackend(model, rows + 3);
  ASSERT_NE(backend, nullptr);
  Uniform rand(seed);
  std::vector<float> params = RandomParams(model, rand);
  const OwnedBatch data = RandomBatch(model, rows, rand);
  std::vector<float> grads(params.size());
  absl::StatusOr<float> loss_value =
      backend->ComputeGradients(params, data.batch, absl::MakeSpan(grads));
  ASSERT_TRUE(loss_value.ok()) << loss_value.status();

  constexpr float kEps = 1e-3f;
  int significant = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const float original = params[i];
    params[i] = original + kEps;
    const double plus = MeanLoss(*backend, params, data.batch);
    params[i] = original - kEps;
    const double minus = MeanLoss(*backend, params, data.batch);
    params[i] = original;
    const double fd = (plus - minus) / (2.0 * kEps);
    EXPECT_NEAR(grads[i], fd, 1e-2 * std::max(1.0, std::abs(fd)))
        << "param element " << i;
    significant += std::abs(fd) > 1e-3;
  }
  // Guards against a check that passes only because everything is zero.
  EXPECT_GT(significant, static_cast<int>(params.size()) / 2);
}

TEST(CpuBackendTest, GradientsMatchFiniteDifferences) {
  CheckGradients("mlp:6-5-4-3", LossKind::kSoftmaxCrossEntropy, 7, 1);
  CheckGradients("linear:5-3", LossKind::kMeanSquaredError, 6, 2);
  CheckGradients("mlp:4-8-2", LossKind::kMeanSquaredError, 5, 3);
  CheckGradients("linear:3-4", LossKind::kSoftmaxCrossEntropy, 4, 4);
  CheckGradients("mlp:3-6-6-2", LossKind::kSoftmaxCrossEntropy, 1, 5);
}

TEST(CpuBackendTest, ZeroLinearModelGivesLogNumClasses) {
  const ModelSpec model = Parse("linear:4-3", LossKind::kSoftmaxCrossEntropy);
  std::unique_ptr<GradientBackend> backend = MakeBackend(model, 8);
  ASSERT_NE(backend, nullptr);
  EXPECT_EQ(backend->name(), "cpu");
  const std::vector<float> params(model.total_params(), 0.0f);
  const std::vector<float> x = {1, 2, 3, 4, -1, 0, 2, 1};
  const std::vector<int32_t> labels = {2, 0};
  Batch batch{x.data(), 2, labels.data(), nullptr};
  std::vector<float> grads(params.size());
  absl::StatusOr<float> loss =
      backend->ComputeGradients(params, batch, absl::MakeSpan(grads));
  ASSERT_TRUE(loss.ok()) << loss.status();
  EXPECT_NEAR(*loss, std::log(3.0), 1e-6);
  // Softmax is uniform, so d(mean loss)/dz[r][j] = (1/3 - [j == label]) / 2.
  for (int j = 0; j < 3; ++j) {
    float bias_grad = 0;
    float weight_grad[4] = {0, 0, 0, 0};
    for (int r = 0; r < 2; ++r) {
      const float dz = (1.0f / 3 - (labels[r] == j)) / 2;
      bias_grad += dz;
      for (int k = 0; k < 4; ++k) weight_grad[k] += dz * x[r * 4 + k];
    }
    EXPECT_NEAR(grads[12 + j], bias_grad, 1e-6) << "bias " << j;
    for (int k = 0; k < 4; ++k) {
      EXPECT_NEAR(grads[j * 4 + k], weight_grad[k], 1e-6)
          << "weight " << j << "," << k;
    }
  }
}

TEST(CpuBackendTest, MeanSquaredErrorKnownValues) {
  // y = x0 + 2 x1 + 0.5 against targets 0.5 below every prediction.
  const ModelSpec model = Parse("linear:2-1", LossKind::kMeanSquaredError);
  std::unique_ptr<GradientBackend> backend = MakeBackend(model, 3);
  ASSERT_NE(backend, nullptr);
  const std::vector<float> params = {1, 2, 0.5f};
  const std::vector<float> x = {1, 0, 0, 1, 1, 1};
  const std::vector<float> targets = {1, 2, 3};
  Batch batch{x.data(), 3, nullptr, targets.data()};
  std::vector<float> grads(3);
  absl::StatusOr<float> loss =
      backend->ComputeGradients(params, batch, absl::MakeSpan(grads));
  ASSERT_TRUE(loss.ok()) << loss.status();
  EXPECT_NEAR(*loss, 0.25, 1e-6);
  EXPECT_NEAR(grads[0], 2.0 / 3, 1e-6);
  EXPECT_NEAR(grads[1], 2.0 / 3, 1e-6);
  EXPECT_NEAR(grads[2], 1.0, 1e-6);
  absl::StatusOr<EvalResult> eval = backend->Evaluate(params, batch);
  ASSERT_TRUE(eval.ok()) << eval.status();
  EXPECT_NEAR(eval->loss_sum, 0.75, 1e-6);
  EXPECT_EQ(eval->correct, 0);
  EXPECT_EQ(eval->count, 3);
}

TEST(CpuBackendTest, MeanSquaredErrorAveragesOverOutputs) {
  // One row, two outputs [1, 0] against targets [0, 1]: MSE is (1 + 1) / 2.
  const ModelSpec model = Parse("linear:1-2", LossKind::kMeanSquaredError);
  std::unique_ptr<GradientBackend> backend = MakeBackend(model, 1);
  ASSERT_NE(backend, nullptr);
  const std::vector<float> params = {1, 0, 0, 0};
  const float x = 1;
  const std::vector<float> targets = {0, 1};
  std::vector<float> grads(4);
  absl::StatusOr<float> loss = backend->ComputeGradients(
      params, Batch{&x, 1, nullptr, targets.data()}, absl::MakeSpan(grads));
  ASSERT_TRUE(loss.ok()) << loss.status();
  EXPECT_NEAR(*loss, 1.0, 1e-6);
  EXPECT_EQ(grads, (std::vector<float>{1, -1, 1, -1}));
}

TEST(CpuBackendTest, EvaluateCountsArgmaxHits) {
  // Identity weights: the prediction is the larger of the two features.
  const ModelSpec model = Parse("linear:2-2", LossKind::kSoftmaxCrossEntropy);
  std::unique_ptr<GradientBackend> backend = MakeBackend(model, 10);
  ASSERT_NE(backend, nullptr);
  const std::vector<float> params = {1, 0, 0, 1, 0, 0};
  const std::vector<float> x = {1, 0, 0, 1, 3, 2, 1, 5};
  const std::vector<int32_t> labels = {0, 1, 1, 1};
  absl::StatusOr<EvalResult> eval =
      backend->Evaluate(params, Batch{x.data(), 4, labels.data(), nullptr});
  ASSERT_TRUE(eval.ok()) << eval.status();
  EXPECT_EQ(eval->correct, 3);
  EXPECT_EQ(eval->count, 4);
  const double expected = std::log1p(std::exp(-1.0)) * 2 +
                          std::log1p(std::exp(1.0)) +
                          std::log1p(std::exp(-4.0));
  EXPECT_NEAR(eval->loss_sum, expected, 1e-5);
}

TEST(CpuBackendTest, GradsFullyOverwrittenAndEvaluateAgrees) {
  const ModelSpec model = Parse("mlp:6-5-4-3", LossKind::kSoftmaxCrossEntropy);
  std::unique_ptr<GradientBackend> backend = MakeBackend(model, 16);
  ASSERT_NE(backend, nullptr);
  Uniform rand(11);
  const std::vector<float> params = RandomParams(model, rand);
  const OwnedBatch data = RandomBatch(model, 9, rand);
  std::vector<float> grads(params.size(),
                           std::numeric_limits<float>::quiet_NaN());
  absl::StatusOr<float> loss =
      backend->ComputeGradients(params, data.batch, absl::MakeSpan(grads));
  ASSERT_TRUE(loss.ok()) << loss.status();
  for (size_t i = 0; i < grads.size(); ++i) {
    ASSERT_TRUE(std::isfinite(grads[i])) << "grad " << i << " not written";
  }
  absl::StatusOr<EvalResult> eval = backend->Evaluate(params, data.batch);
  ASSERT_TRUE(eval.ok()) << eval.status();
  EXPECT_EQ(eval->count, 9);
  EXPECT_NEAR(eval->loss_sum / 9, *loss, 1e-5 * std::max(1.0f, *loss));

  // A second call on a smaller batch must not see stale state.
  Batch first_rows = data.batch;
  first_rows.rows = 4;
  std::unique_ptr<GradientBackend> fresh = MakeBackend(model, 4);
  std::vector<float> expected(params.size());
  std::vector<float> again(params.size());
  ASSERT_TRUE(
      fresh->ComputeGradients(params, first_rows, absl::MakeSpan(expected))
          .ok());
  ASSERT_TRUE(
      backend->ComputeGradients(params, first_rows, absl::MakeSpan(again))
          .ok());
  EXPECT_EQ(again, expected);
}

// ComputeGradientsReporting names every parameter once, last layer first,
// and keeps its promise: at each report the parameter's gradient already
// has its final value, and overwriting the parameter's values from then on
// (as a pull arriving during backward does) changes no gradient.
TEST(CpuBackendTest, ReportedParametersAreFinalAndNoLongerRead) {
  for (const std::string spec : {"mlp:7-6-5-4-3", "linear:5-3"}) {
    SCOPED_TRACE(spec);
    const ModelSpec model = Parse(spec, LossKind::kSoftmaxCrossEntropy);
    std::unique_ptr<GradientBackend> backend = MakeBackend(model, 16);
    ASSERT_NE(backend, nullptr);
    Uniform rand(23);
    const std::vector<float> params = RandomParams(model, rand);
    const OwnedBatch data = RandomBatch(model, 11, rand);
    std::vector<float> expected(params.size());
    absl::StatusOr<float> want =
        backend->ComputeGradients(params, data.batch, absl::MakeSpan(expected));
    ASSERT_TRUE(want.ok()) << want.status();

    const std::vector<int64_t> offsets = model.param_offsets();
    std::vector<float> poisoned = params;
    std::vector<float> grads(params.size(), std::numeric_limits<float>::quiet_NaN());
    std::vector<int> order;
    std::vector<std::vector<float>> at_report(model.params.size());
    absl::StatusOr<float> got = backend->ComputeGradientsReporting(
        poisoned, data.batch, absl::MakeSpan(grads), [&](int p) {
          ASSERT_GE(p, 0);
          ASSERT_LT(p, static_cast<int>(model.params.size()));
          order.push_back(p);
          const int64_t begin = offsets[p], n = model.params[p].num_elements();
          at_report[p].assign(grads.begin() + begin, grads.begin() + begin + n);
          std::fill(poisoned.begin() + begin, poisoned.begin() + begin + n,
                    std::numeric_limits<float>::quiet_NaN());
        });
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, *want);
    EXPECT_EQ(grads, expected);  // no NaN reached any gradient
    // Every parameter once; the last layer's before the first layer's.
    std::vector<int> sorted = order;
    std::sort(sorted.begin(), sorted.end());
    std::vector<int> all(model.params.size());
    for (size_t p = 0; p < all.size(); ++p) all[p] = static_cast<int>(p);
    EXPECT_EQ(sorted, all);
    const int last_weight = static_cast<int>(model.params.size()) - 2;
    const auto pos = [&](int p) {
      return std::find(order.begin(), order.end(), p) - order.begin();
    };
    EXPECT_LT(pos(last_weight + 1), pos(0));
    if (last_weight > 0) {
      EXPECT_LT(pos(last_weight), pos(0));
    }
    for (size_t p = 0; p < model.params.size(); ++p) {
      const std::vector<float> final_values(expected.begin() + offsets[p],
                                            expected.begin() + offsets[p] +
                                                model.params[p].num_elements());
      EXPECT_EQ(at_report[p], final_values) << "param " << p << " was reported before it was final";
    }
  }
}

TEST(CpuBackendTest, BadInputsRejectedAndGradsUntouched) {
  const ModelSpec model = Parse("mlp:3-4-2", LossKind::kSoftmaxCrossEntropy);
  std::unique_ptr<GradientBackend> backend = MakeBackend(model, 4);
  ASSERT_NE(backend, nullptr);
  Uniform rand(3);
  const std::vector<float> params = RandomParams(model, rand);
  OwnedBatch data = RandomBatch(model, 4, rand);

  struct Case {
    std::string what;
    Batch batch;
    size_t params_size;
    size_t grads_size;
    std::string expected;
  };
  const size_t n = params.size();
  const Batch good = data.batch;
  std::vector<int32_t> bad_labels = data.labels;
  bad_labels[2] = 2;
  std::vector<int32_t> negative_labels = data.labels;
  negative_labels[0] = -1;
  std::vector<Case> cases = {
      {"too many rows", {good.features, 5, good.labels, nullptr}, n, n,
       "max_batch"},
      {"zero rows", {good.features, 0, good.labels, nullptr}, n, n,
       "batch rows 0"},
      {"label too big", {good.features, 4, bad_labels.data(), nullptr}, n, n,
       "label 2 at row 2"},
      {"negative label", {good.features, 4, negative_labels.data(), nullptr},
       n, n, "label -1 at row 0"},
      {"null features", {nullptr, 4, good.labels, nullptr}, n, n,
       "features is null"},
      {"null labels", {good.features, 4, nullptr, nullptr}, n, n,
       "labels is null"},
      {"short params", good, n - 1, n, "params has"},
      {"long grads", good, n, n + 1, "grads has"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    std::vector<float> p(params.begin(), params.end());
    p.resize(c.params_size);
    std::vector<float> grads(c.grads_size, 7.0f);
    absl::StatusOr<float> loss =
        backend->ComputeGradients(p, c.batch, absl::MakeSpan(grads));
    ASSERT_FALSE(loss.ok());
    EXPECT_EQ(loss.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(loss.status().message(), c.expected))
        << loss.status();
    EXPECT_TRUE(std::all_of(grads.begin(), grads.end(),
                            [](float g) { return g == 7.0f; }));
    if (c.grads_size == n) {
      EXPECT_EQ(backend->Evaluate(p, c.batch).status().code(),
                absl::StatusCode::kInvalidArgument);
    }
  }
  // The backend still works after rejecting bad input.
  std::vector<float> grads(n);
  EXPECT_TRUE(backend->ComputeGradients(params, good, absl::MakeSpan(grads))
                  .ok());
}

TEST(CpuBackendTest, MeanSquaredErrorNeedsTargets) {
  const ModelSpec model = Parse("linear:2-1", LossKind::kMeanSquaredError);
  std::unique_ptr<GradientBackend> backend = MakeBackend(model, 2);
  ASSERT_NE(backend, nullptr);
  const std::vector<float> params(3, 0.0f), x(4, 1.0f);
  const std::vector<int32_t> labels = {0, 0};
  absl::StatusOr<EvalResult> eval =
      backend->Evaluate(params, Batch{x.data(), 2, labels.data(), nullptr});
  EXPECT_EQ(eval.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(eval.status().message(), "targets is null"));
}

TEST(CpuBackendTest, CreateRejectsBadArguments) {
  ModelSpec model = Parse("mlp:3-4-2", LossKind::kSoftmaxCrossEntropy);
  EXPECT_EQ(CreateCpuBackend(model, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(CreateCpuBackend(model, -5).status().message(),
                                "max_batch -5"));
  EXPECT_EQ(CreateCpuBackend(model, int64_t{1} << 40).status().code(),
            absl::StatusCode::kInvalidArgument);
  ModelSpec broken = model;
  broken.params.pop_back();
  EXPECT_EQ(CreateCpuBackend(broken, 8).status().code(),
            absl::StatusCode::kInvalidArgument);
  broken = model;
  broken.params[2].shape = {2, 5};
  EXPECT_TRUE(absl::StrContains(CreateCpuBackend(broken, 8).status().message(),
                                "fc1.weight"));
}

TEST(CpuBackendTest, SgdLearnsSeparableClusters) {
  // Three well separated clusters in the plane.
  const float centers[3][2] = {{0, 3}, {3, -2}, {-3, -2}};
  Uniform rand(21);
  std::vector<float> x;
  std::vector<int32_t> labels;
  for (int i = 0; i < 90; ++i) {
    const int c = i % 3;
    x.push_back(centers[c][0] + rand(-0.7f, 0.7f));
    x.push_back(centers[c][1] + rand(-0.7f, 0.7f));
    labels.push_back(c);
  }
  const ModelSpec model = Parse("mlp:2-16-3", LossKind::kSoftmaxCrossEntropy);
  std::unique_ptr<GradientBackend> backend = MakeBackend(model, 30);
  ASSERT_NE(backend, nullptr);
  std::vector<float> params(model.total_params());
  const std::vector<int64_t> offsets = model.param_offsets();
  for (size_t i = 0; i < model.params.size(); ++i) {
    const ParamSpec& p = model.params[i];
    InitParameter(p, static_cast<int>(i), 5, 0, p.num_elements(),
                  params.data() + offsets[i]);
  }
  std::vector<float> grads(params.size());
  const Batch all{x.data(), 90, labels.data(), nullptr};
  absl::StatusOr<float> first_loss;
  for (int step = 0; step < 300; ++step) {
    const int64_t begin = (step % 3) * 30;
    const Batch batch{x.data() + 2 * begin, 30, labels.data() + begin,
                      nullptr};
    absl::StatusOr<float> loss =
        backend->ComputeGradients(params, batch, absl::MakeSpan(grads));
    ASSERT_TRUE(loss.ok()) << loss.status();
    if (step == 0) first_loss = loss;
    for (size_t i = 0; i < params.size(); ++i) params[i] -= 0.1f * grads[i];
  }
  int64_t correct = 0;
  double loss_sum = 0;
  for (int64_t begin = 0; begin < 90; begin += 30) {
    absl::StatusOr<EvalResult> eval = backend->Evaluate(
        params, Batch{all.features + 2 * begin, 30, all.labels + begin,
                      nullptr});
    ASSERT_TRUE(eval.ok()) << eval.status();
    correct += eval->correct;
    loss_sum += eval->loss_sum;
  }
  EXPECT_EQ(correct, 90);
  EXPECT_LT(loss_sum / 90, 0.1);
  EXPECT_LT(loss_sum / 90, *first_loss / 5);
}

}  // namespace
}  // namespace tessera
