#include "common/model_spec.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

TEST(ParseModelSpecTest, ParsesMlp) {
  absl::StatusOr<ModelSpec> model =
      ParseModelSpec("mlp:784-256-128-10", LossKind::kSoftmaxCrossEntropy);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->kind, "mlp");
  EXPECT_EQ(model->layer_sizes, (std::vector<int64_t>{784, 256, 128, 10}));
  EXPECT_EQ(model->loss, LossKind::kSoftmaxCrossEntropy);
  EXPECT_EQ(model->input_dim(), 784);
  EXPECT_EQ(model->output_dim(), 10);
  ASSERT_EQ(model->params.size(), 6u);
  const std::vector<std::string> names = {"fc0.weight", "fc0.bias",
                                          "fc1.weight", "fc1.bias",
                                          "fc2.weight", "fc2.bias"};
  const std::vector<std::vector<int64_t>> shapes = {
      {256, 784}, {256}, {128, 256}, {128}, {10, 128}, {10}};
  const std::vector<int64_t> fan_ins = {784, 784, 256, 256, 128, 128};
  for (size_t i = 0; i < names.size(); ++i) {
    EXPECT_EQ(model->params[i].name, names[i]);
    EXPECT_EQ(model->params[i].shape, shapes[i]) << names[i];
    EXPECT_EQ(model->params[i].fan_in, fan_ins[i]) << names[i];
    EXPECT_EQ(model->params[i].is_bias, i % 2 == 1) << names[i];
  }
  EXPECT_EQ(model->params[0].num_elements(), 256 * 784);
  EXPECT_EQ(model->total_params(), 235146);
  EXPECT_EQ(model->param_offsets(),
            (std::vector<int64_t>{0, 200704, 200960, 233728, 233856, 235136}));
}

TEST(ParseModelSpecTest, ParsesLinear) {
  absl::StatusOr<ModelSpec> model =
      ParseModelSpec("linear:10-1", LossKind::kMeanSquaredError);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->kind, "linear");
  EXPECT_EQ(model->loss, LossKind::kMeanSquaredError);
  ASSERT_EQ(model->params.size(), 2u);
  EXPECT_EQ(model->params[0].shape, (std::vector<int64_t>{1, 10}));
  EXPECT_EQ(model->params[1].shape, (std::vector<int64_t>{1}));
  EXPECT_EQ(model->total_params(), 11);
  EXPECT_EQ(model->param_offsets(), (std::vector<int64_t>{0, 10}));
}

TEST(ParseModelSpecTest, RejectsBadSpecsWithSpecificMessages) {
  struct Case {
    const char* spec;
    const char* expected;
  };
  const Case cases[] = {
      {"cnn:1-2", "unknown kind 'cnn'"},
      {"784-10", "unknown kind"},
      {"mlp:784", "at least 2 layer sizes, got 1"},
      {"mlp", "at least 2 layer sizes, got 0"},
      {"mlp:", "at least 2 layer sizes, got 0"},
      {"mlp:784-abc-10", "layer size 'abc' is not a number"},
      {"mlp:784--10", "layer size '' is not a number"},
      {"mlp:784-0-10", "layer size 0 is not positive"},
      {"mlp:784-16777217", "exceeds the limit"},
      {"linear:10-5-1", "exactly 2 layer sizes, got 3"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<ModelSpec> model =
        ParseModelSpec(c.spec, LossKind::kSoftmaxCrossEntropy);
    ASSERT_FALSE(model.ok()) << c.spec;
    EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
    const absl::string_view message = model.status().message();
    EXPECT_TRUE(absl::StrContains(message, c.expected)) << message;
    EXPECT_TRUE(absl::StrContains(message, absl::StrCat("'", c.spec, "'")))
        << message;
  }
}

TEST(ParseModelSpecTest, AcceptsLargestSize) {
  EXPECT_TRUE(
      ParseModelSpec("linear:16777216-1", LossKind::kMeanSquaredError).ok());
}

std::vector<float> InitAll(const ParamSpec& p, int index, uint64_t seed) {
  std::vector<float> values(p.num_elements());
  InitParameter(p, index, seed, 0, p.num_elements(), values.data());
  return values;
}

TEST(InitParameterTest, DeterministicAndIndependentOfSplit) {
  const ModelSpec model =
      *ParseModelSpec("mlp:30-20-5", LossKind::kSoftmaxCrossEntropy);
  const ParamSpec& w = model.params[0];
  const std::vector<float> whole = InitAll(w, 0, 42);
  EXPECT_EQ(whole, InitAll(w, 0, 42));

  for (int64_t cut : {int64_t{1}, int64_t{7}, int64_t{300}, int64_t{599}}) {
    std::vector<float> pieces(w.num_elements());
    InitParameter(w, 0, 42, 0, cut, pieces.data());
    InitParameter(w, 0, 42, cut, w.num_elements(), pieces.data() + cut);
    EXPECT_EQ(pieces, whole) << "cut at " << cut;
  }
  // An empty range writes nothing.
  float sentinel = 123.0f;
  InitParameter(w, 0, 42, 5, 5, &sentinel);
  EXPECT_EQ(sentinel, 123.0f);
}

TEST(InitParameterTest, DependsOnSeedAndParamIndex) {
  const ModelSpec model =
      *ParseModelSpec("mlp:30-20-5", LossKind::kSoftmaxCrossEntropy);
  const ParamSpec& w = model.params[0];
  const std::vector<float> base = InitAll(w, 0, 42);
  EXPECT_NE(base, InitAll(w, 0, 43));
  EXPECT_NE(base, InitAll(w, 2, 42));
}

TEST(InitParameterTest, WithinFanInBoundsAndSpread) {
  const ModelSpec model =
      *ParseModelSpec("mlp:100-16-4", LossKind::kSoftmaxCrossEntropy);
  for (size_t i = 0; i < model.params.size(); ++i) {
    const ParamSpec& p = model.params[i];
    const std::vector<float> values = InitAll(p, static_cast<int>(i), 7);
    const float bound = static_cast<float>(1.0 / std::sqrt(double(p.fan_in)));
    float lo = values[0], hi = values[0];
    double sum = 0;
    for (float v : values) {
      EXPECT_LE(std::abs(v), bound) << p.name;
      lo = std::min(lo, v);
      hi = std::max(hi, v);
      sum += v;
    }
    EXPECT_GT(std::set<float>(values.begin(), values.end()).size(),
              values.size() / 2)
        << p.name;
    if (values.size() >= 100) {
      // A uniform sample this large covers most of the range and is
      // centered near zero.
      EXPECT_LT(lo, -0.8f * bound) << p.name;
      EXPECT_GT(hi, 0.8f * bound) << p.name;
      EXPECT_LT(std::abs(sum / values.size()), 0.1 * bound) << p.name;
    }
  }
  // fc0 uses fan_in 100 (bound 0.1); fc1 uses fan_in 16 (bound 0.25), so
  // some fc1 weights must exceed fc0's bound.
  const std::vector<float> fc1 = InitAll(model.params[2], 2, 7);
  EXPECT_GT(*std::max_element(fc1.begin(), fc1.end()), 0.1f);
}

}  // namespace
}  // namespace tessera
