// The CUDA backend checked against the CPU backend (and each kernel against a
// host reference) on fresh random inputs. Every test that needs a GPU skips
// when none is visible; CTest labels this binary `gpu`.

#include "worker/cuda/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "common/model_spec.h"
#include "gtest/gtest.h"
#include "worker/backend_factory.h"
#include "worker/cpu_backend.h"
#include "worker/cuda/kernels.cuh"

namespace tessera {
namespace {

namespace ck = cuda_kernels;

#define SKIP_WITHOUT_GPU() \
  if (!CudaDeviceAvailable()) GTEST_SKIP() << "no CUDA device"

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

// Host reference for float -> bf16, round to nearest even.
uint16_t HostBf16Bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float HostBf16ToFloat(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

float RoundToBf16(float x) { return HostBf16ToFloat(HostBf16Bits(x)); }

// Device memory for a test, freed on scope exit.
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : n_(n) {
    EXPECT_EQ(cudaMalloc(&ptr_, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess);
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) {
    EXPECT_EQ(cudaMemcpy(ptr_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { cudaFree(ptr_); }

  T* get() { return static_cast<T*>(ptr_); }
  std::vector<T> ToHost() const {
    std::vector<T> host(n_);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  }
  // Fills every byte with `byte` (0xff makes floats NaN).
  void Poison(int byte = 0xff) {
    EXPECT_EQ(cudaMemset(ptr_, byte, std::max<size_t>(n_, 1) * sizeof(T)), cudaSuccess);
  }

 private:
  void* ptr_ = nullptr;
  size_t n_;
};

std::vector<float> RandomVector(size_t n, float lo, float hi, Uniform& rand) {
  std::vector<float> v(n);
  for (float& x : v) x = rand(lo, hi);
  return v;
}

std::vector<int32_t> RandomLabels(int64_t rows, int64_t classes, Uniform& rand) {
  std::vector<int32_t> labels(rows);
  for (int32_t& y : labels) y = rand.Below(static_cast<int32_t>(classes));
  return labels;
}

// |a - b| <= tol * max(1, |b|).
void ExpectClose(const std::vector<float>& actual, const std::vector<double>& expected, double tol,
                 const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (size_t i = 0; i < actual.size(); ++i) {
    ASSERT_NEAR(actual[i], expected[i], tol * std::max(1.0, std::abs(expected[i])))
        << what << " element " << i;
  }
}

// ---------------------------------------------------------------------------
// Kernels, one by one, against host references.

TEST(CudaKernelsTest, BiasActivation) {
  SKIP_WITHOUT_GPU();
  Uniform rand(1);
  for (const bool relu : {true, false}) {
    // 300 columns exercise the strided column loop.
    for (const int64_t cols : {int64_t{7}, int64_t{300}}) {
      SCOPED_TRACE(std::string(relu ? "relu" : "identity") + " cols " + std::to_string(cols));
      const int64_t rows = 37;
      const std::vector<float> z = RandomVector(rows * cols, -3, 3, rand);
      const std::vector<float> bias = RandomVector(cols, -1, 1, rand);
      DeviceArray<float> d_z(z);
      DeviceArray<float> d_bias(bias);
      DeviceArray<uint16_t> d_bf16(rows * cols);
      ASSERT_EQ(ck::LaunchBiasActivation(d_z.get(), d_bias.get(), rows, cols, relu, d_bf16.get(),
                                         nullptr),
                cudaSuccess);
      const std::vector<float> out = d_z.ToHost();
      const std::vector<uint16_t> out_bf16 = d_bf16.ToHost();
      int clamped = 0;
      for (int64_t i = 0; i < rows * cols; ++i) {
        float expected = z[i] + bias[i % cols];
        if (relu && expected < 0) {
          expected = 0;
          ++clamped;
        }
        ASSERT_EQ(out[i], expected) << "element " << i;
        ASSERT_EQ(out_bf16[i], HostBf16Bits(expected)) << "element " << i;
      }
      if (relu) {
        EXPECT_GT(clamped, 0);
      }
    }
  }
}

TEST(CudaKernelsTest, ReluBackward) {
  SKIP_WITHOUT_GPU();
  Uniform rand(2);
  const int64_t n = 5000;
  std::vector<float> act = RandomVector(n, -1, 1, rand);
  for (int64_t i = 0; i < n; i += 3) act[i] = std::max(act[i], 0.0f);
  act[1] = 0.0f;  // exactly zero blocks the gradient
  const std::vector<float> da = RandomVector(n, -2, 2, rand);
  DeviceArray<float> d_act(act);
  DeviceArray<float> d_da(da);
  DeviceArray<uint16_t> d_bf16(n);
  ASSERT_EQ(ck::LaunchReluBackward(d_da.get(), d_act.get(), n, d_bf16.get(), nullptr), cudaSuccess);
  const std::vector<float> out = d_da.ToHost();
  const std::vector<uint16_t> out_bf16 = d_bf16.ToHost();
  for (int64_t i = 0; i < n; ++i) {
    const float expected = act[i] > 0 ? da[i] : 0.0f;
    ASSERT_EQ(out[i], expected) << "element " << i;
    ASSERT_EQ(out_bf16[i], HostBf16Bits(expected)) << "element " << i;
  }
  EXPECT_EQ(out[1], 0.0f);
}

// Host softmax cross-entropy in double, as the CPU backend computes it.
void HostSoftmaxCrossEntropy(const std::vector<float>& z, const std::vector<int32_t>& labels,
                             int64_t rows, int64_t cols, std::vector<double>* row_loss,
                             std::vector<int32_t>* row_correct, std::vector<double>* dz) {
  row_loss->assign(rows, 0);
  row_correct->assign(rows, 0);
  dz->assign(rows * cols, 0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* zr = z.data() + r * cols;
    int64_t argmax = 0;
    for (int64_t j = 1; j < cols; ++j) {
      if (zr[j] > zr[argmax]) argmax = j;
    }
    const double max = zr[argmax];
    double sum = 0;
    for (int64_t j = 0; j < cols; ++j) sum += std::exp(zr[j] - max);
    const double log_sum = std::log(sum);
    (*row_loss)[r] = log_sum - (zr[labels[r]] - max);
    (*row_correct)[r] = argmax == labels[r];
    for (int64_t j = 0; j < cols; ++j) {
      (*dz)[r * cols + j] = (std::exp(zr[j] - max - log_sum) - (j == labels[r])) / rows;
    }
  }
}

TEST(CudaKernelsTest, SoftmaxCrossEntropy) {
  SKIP_WITHOUT_GPU();
  Uniform rand(3);
  // 77 columns: more than one pass of a warp over the row.
  for (const int64_t cols : {int64_t{10}, int64_t{77}}) {
    SCOPED_TRACE("cols " + std::to_string(cols));
    const int64_t rows = 67;
    std::vector<float> z = RandomVector(rows * cols, -4, 4, rand);
    // Large logits: only a max-shifted softmax stays finite.
    for (int64_t j = 0; j < cols; ++j) z[5 * cols + j] += 500.0f;
    std::vector<int32_t> labels = RandomLabels(rows, cols, rand);
    // A tie for the maximum counts the first index only.
    z[7 * cols + 2] = 20.0f;
    z[7 * cols + 4] = 20.0f;
    labels[7] = 4;
    z[8 * cols + 1] = 20.0f;
    z[8 * cols + 3] = 20.0f;
    labels[8] = 1;
    std::vector<double> loss, dz;
    std::vector<int32_t> correct;
    HostSoftmaxCrossEntropy(z, labels, rows, cols, &loss, &correct, &dz);
    ASSERT_EQ(correct[7], 0);
    ASSERT_EQ(correct[8], 1);

    DeviceArray<float> d_z(z);
    DeviceArray<int32_t> d_labels(labels);
    DeviceArray<float> d_loss(rows);
    DeviceArray<int32_t> d_correct(rows);
    DeviceArray<float> d_dz(rows * cols);
    d_dz.Poison();
    ASSERT_EQ(ck::LaunchSoftmaxCrossEntropy(d_z.get(), d_labels.get(), rows, cols, d_loss.get(),
                                            d_correct.get(), d_dz.get(), nullptr),
              cudaSuccess);
    ExpectClose(d_loss.ToHost(), loss, 1e-5, "row loss");
    ExpectClose(d_dz.ToHost(), dz, 1e-6, "dlogits");
    EXPECT_EQ(d_correct.ToHost(), correct);

    // Forward only: no gradient buffer, same losses.
    DeviceArray<float> d_loss2(rows);
    ASSERT_EQ(ck::LaunchSoftmaxCrossEntropy(d_z.get(), d_labels.get(), rows, cols, d_loss2.get(),
                                            d_correct.get(), nullptr, nullptr),
              cudaSuccess);
    ExpectClose(d_loss2.ToHost(), loss, 1e-5, "row loss without gradient");
  }
}

TEST(CudaKernelsTest, MeanSquaredError) {
  SKIP_WITHOUT_GPU();
  Uniform rand(4);
  const int64_t rows = 29;
  const int64_t cols = 45;
  const std::vector<float> out = RandomVector(rows * cols, -2, 2, rand);
  const std::vector<float> targets = RandomVector(rows * cols, -2, 2, rand);
  std::vector<double> loss(rows, 0), dout(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      const double diff = double(out[r * cols + j]) - targets[r * cols + j];
      loss[r] += diff * diff / cols;
      dout[r * cols + j] = 2 * diff / (rows * cols);
    }
  }
  DeviceArray<float> d_out(out);
  DeviceArray<float> d_targets(targets);
  DeviceArray<float> d_loss(rows);
  DeviceArray<float> d_dout(rows * cols);
  d_dout.Poison();
  ASSERT_EQ(ck::LaunchMeanSquaredError(d_out.get(), d_targets.get(), rows, cols, d_loss.get(),
                                       d_dout.get(), nullptr),
            cudaSuccess);
  ExpectClose(d_loss.ToHost(), loss, 1e-5, "row loss");
  ExpectClose(d_dout.ToHost(), dout, 1e-6, "dout");
}

TEST(CudaKernelsTest, ReduceLoss) {
  SKIP_WITHOUT_GPU();
  Uniform rand(5);
  for (const int64_t rows : {int64_t{1}, int64_t{255}, int64_t{1000}}) {
    SCOPED_TRACE("rows " + std::to_string(rows));
    const std::vector<float> loss = RandomVector(rows, 0, 5, rand);
    std::vector<int32_t> correct(rows);
    double loss_sum = 0;
    int64_t hits = 0;
    for (int64_t r = 0; r < rows; ++r) {
      correct[r] = rand.Below(2);
      loss_sum += loss[r];
      hits += correct[r];
    }
    DeviceArray<float> d_loss(loss);
    DeviceArray<int32_t> d_correct(correct);
    DeviceArray<ck::LossTotals> d_totals(1);
    ASSERT_EQ(ck::LaunchReduceLoss(d_loss.get(), d_correct.get(), rows, d_totals.get(), nullptr),
              cudaSuccess);
    ck::LossTotals totals = d_totals.ToHost()[0];
    EXPECT_NEAR(totals.loss_sum, loss_sum, 1e-9 * loss_sum);
    EXPECT_EQ(totals.correct, hits);
    ASSERT_EQ(ck::LaunchReduceLoss(d_loss.get(), nullptr, rows, d_totals.get(), nullptr),
              cudaSuccess);
    totals = d_totals.ToHost()[0];
    EXPECT_NEAR(totals.loss_sum, loss_sum, 1e-9 * loss_sum);
    EXPECT_EQ(totals.correct, 0);
  }
}

TEST(CudaKernelsTest, ColumnSums) {
  SKIP_WITHOUT_GPU();
  Uniform rand(6);
  for (const int64_t cols : {int64_t{10}, int64_t{70}, int64_t{4100}}) {
    SCOPED_TRACE("cols " + std::to_string(cols));
    const int64_t rows = 513;
    const std::vector<float> m = RandomVector(rows * cols, -1, 1, rand);
    std::vector<double> sums(cols, 0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) sums[j] += m[r * cols + j];
    }
    DeviceArray<float> d_m(m);
    DeviceArray<float> d_out(cols);
    d_out.Poison();
    ASSERT_EQ(ck::LaunchColumnSums(d_m.get(), rows, cols, d_out.get(), nullptr), cudaSuccess);
    ExpectClose(d_out.ToHost(), sums, 1e-5, "column sums");
  }
}

TEST(CudaKernelsTest, Bf16Conversions) {
  SKIP_WITHOUT_GPU();
  Uniform rand(7);
  std::vector<float> x = RandomVector(10000, -100, 100, rand);
  // Halfway cases round to even; specials survive.
  x[0] = HostBf16ToFloat(0x3f80) + 0x1.0p-8f;  // 1 + half an ulp: to 1
  x[1] = HostBf16ToFloat(0x3f81) + 0x1.0p-8f;  // odd + half an ulp: up
  x[2] = std::numeric_limits<float>::infinity();
  x[3] = -0.0f;
  x[4] = 1e-40f;                             // subnormal
  x[5] = std::numeric_limits<float>::max();  // rounds to infinity
  DeviceArray<float> d_x(x);
  DeviceArray<uint16_t> d_bf16(x.size());
  ASSERT_EQ(ck::LaunchF32ToBf16(d_x.get(), d_bf16.get(), x.size(), nullptr), cudaSuccess);
  const std::vector<uint16_t> bits = d_bf16.ToHost();
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(bits[i], HostBf16Bits(x[i])) << "element " << i << " = " << x[i];
  }
  EXPECT_EQ(bits[0], 0x3f80);
  EXPECT_EQ(bits[1], 0x3f82);
  DeviceArray<float> d_back(x.size());
  ASSERT_EQ(ck::LaunchBf16ToF32(d_bf16.get(), d_back.get(), x.size(), nullptr), cudaSuccess);
  const std::vector<float> back = d_back.ToHost();
  for (size_t i = 0; i < x.size(); ++i) {
    const float expected = HostBf16ToFloat(bits[i]);
    ASSERT_EQ(std::memcmp(&back[i], &expected, sizeof(float)), 0) << "element " << i;
  }
}

TEST(CudaKernelsTest, EmptyInputsLaunchNothing) {
  SKIP_WITHOUT_GPU();
  EXPECT_EQ(ck::LaunchBiasActivation(nullptr, nullptr, 0, 5, true, nullptr, nullptr), cudaSuccess);
  EXPECT_EQ(ck::LaunchReluBackward(nullptr, nullptr, 0, nullptr, nullptr), cudaSuccess);
  EXPECT_EQ(ck::LaunchF32ToBf16(nullptr, nullptr, 0, nullptr), cudaSuccess);
  DeviceArray<float> d_out(3);
  d_out.Poison();
  ASSERT_EQ(ck::LaunchColumnSums(nullptr, 0, 3, d_out.get(), nullptr), cudaSuccess);
  EXPECT_EQ(d_out.ToHost(), std::vector<float>(3, 0.0f));
}

// ---------------------------------------------------------------------------
// The whole backend against the CPU backend.

ModelSpec Parse(const std::string& spec, LossKind loss) {
  absl::StatusOr<ModelSpec> model = ParseModelSpec(spec, loss);
  EXPECT_TRUE(model.ok()) << model.status();
  return *model;
}

std::unique_ptr<GradientBackend> MakeCuda(const ModelSpec& model, int64_t max_batch,
                                          GemmPrecision precision) {
  absl::StatusOr<std::unique_ptr<GradientBackend>> backend =
      CreateCudaBackend(model, max_batch, precision);
  EXPECT_TRUE(backend.ok()) << backend.status();
  return backend.ok() ? std::move(*backend) : nullptr;
}

std::unique_ptr<GradientBackend> MakeCpu(const ModelSpec& model, int64_t max_batch) {
  absl::StatusOr<std::unique_ptr<GradientBackend>> backend = CreateCpuBackend(model, max_batch);
  EXPECT_TRUE(backend.ok()) << backend.status();
  return backend.ok() ? std::move(*backend) : nullptr;
}

// A random batch for `model` with its own storage.
struct OwnedBatch {
  std::vector<float> features;
  std::vector<int32_t> labels;
  std::vector<float> targets;
  Batch batch;
};

// `bf16_exact` rounds the features to bf16, so that a bf16 GEMM sees exactly
// the values the fp32 CPU reference sees.
OwnedBatch RandomBatch(const ModelSpec& model, int64_t rows, Uniform& rand,
                       bool bf16_exact = false) {
  OwnedBatch b;
  b.features = RandomVector(rows * model.input_dim(), -2, 2, rand);
  if (bf16_exact) {
    for (float& x : b.features) x = RoundToBf16(x);
  }
  b.batch.features = b.features.data();
  b.batch.rows = rows;
  if (model.loss == LossKind::kSoftmaxCrossEntropy) {
    b.labels = RandomLabels(rows, model.output_dim(), rand);
    b.batch.labels = b.labels.data();
  } else {
    b.targets = RandomVector(rows * model.output_dim(), -1.5f, 1.5f, rand);
    b.batch.targets = b.targets.data();
  }
  return b;
}

// Uniform in +-1/sqrt(fan_in) per tensor, as a freshly initialized layer is,
// so activations stay of order one at every depth.
std::vector<float> RandomParams(const ModelSpec& model, Uniform& rand, bool bf16_exact = false) {
  std::vector<float> params;
  for (const ParamSpec& p : model.params) {
    const float s = 1.0f / std::sqrt(static_cast<float>(p.fan_in));
    for (int64_t i = 0; i < p.num_elements(); ++i) {
      const float v = rand(-s, s);
      params.push_back(bf16_exact ? RoundToBf16(v) : v);
    }
  }
  return params;
}

// ||actual - expected|| / ||expected|| over elements [begin, end).
double RelativeError(const std::vector<float>& actual, const std::vector<float>& expected,
                     int64_t begin, int64_t end) {
  double diff = 0, norm = 0;
  for (int64_t i = begin; i < end; ++i) {
    const double d = double(actual[i]) - expected[i];
    diff += d * d;
    norm += double(expected[i]) * expected[i];
  }
  if (norm == 0) return diff == 0 ? 0 : std::numeric_limits<double>::infinity();
  return std::sqrt(diff / norm);
}

// Per-tensor tolerances for one comparison. In reduced precision a
// pre-activation within rounding error of zero switches its ReLU on one side
// and not on the other, which moves the gradients of the layers below that
// ReLU by several percent however correct both sides are. With bf16-exact
// parameters and features the first layer's pre-activations agree to fp32
// rounding, so only ReLUs after the second layer and above can flip: the
// last layer, and every layer of a one-hidden-layer MLP, meet `tol`; the
// others are held to the loose `deep_tol`, which still catches a wrong
// operand or transpose.
struct Tolerance {
  double tol;
  double deep_tol;
  double loss_tol;
};

constexpr Tolerance kF32Tol = {1e-4, 1e-4, 1e-5};
constexpr Tolerance kTf32Tol = {1e-2, 3e-1, 1e-3};
constexpr Tolerance kBf16Tol = {2e-2, 3e-1, 2e-3};

// Runs one step on both backends and compares loss and every gradient
// tensor. `grads` is poisoned with NaN first, so an element the CUDA backend
// fails to write shows up.
void ExpectStepMatchesCpu(const ModelSpec& model, GradientBackend& cuda, GradientBackend& cpu,
                          const std::vector<float>& params, const Batch& batch,
                          const Tolerance& tol) {
  std::vector<float> expected(params.size());
  absl::StatusOr<float> cpu_loss = cpu.ComputeGradients(params, batch, absl::MakeSpan(expected));
  ASSERT_TRUE(cpu_loss.ok()) << cpu_loss.status();
  std::vector<float> grads(params.size(), std::numeric_limits<float>::quiet_NaN());
  absl::StatusOr<float> loss = cuda.ComputeGradients(params, batch, absl::MakeSpan(grads));
  ASSERT_TRUE(loss.ok()) << loss.status();
  EXPECT_NEAR(*loss, *cpu_loss, tol.loss_tol * std::max(1.0f, *cpu_loss));
  for (size_t i = 0; i < grads.size(); ++i) {
    ASSERT_TRUE(std::isfinite(grads[i])) << "grad " << i << " not written";
  }
  const std::vector<int64_t> offsets = model.param_offsets();
  const int num_layers = static_cast<int>(model.params.size() / 2);
  for (size_t p = 0; p < model.params.size(); ++p) {
    const int layer = static_cast<int>(p / 2);
    const bool tight = layer == num_layers - 1 || num_layers <= 2;
    const double limit = tight ? tol.tol : tol.deep_tol;
    const int64_t end = offsets[p] + model.params[p].num_elements();
    EXPECT_LE(RelativeError(grads, expected, offsets[p], end), limit)
        << model.params[p].name << " (batch rows " << batch.rows << ")";
  }
}

struct StepCase {
  std::string spec;
  LossKind loss;
  int64_t rows;
};

void CheckModels(const std::vector<StepCase>& cases, GemmPrecision precision, const Tolerance& tol,
                 bool bf16_exact) {
  uint32_t seed = 100;
  for (const StepCase& c : cases) {
    SCOPED_TRACE(c.spec + " rows " + std::to_string(c.rows) + " " +
                 std::string(GemmPrecisionName(precision)));
    const ModelSpec model = Parse(c.spec, c.loss);
    std::unique_ptr<GradientBackend> cuda = MakeCuda(model, c.rows, precision);
    std::unique_ptr<GradientBackend> cpu = MakeCpu(model, c.rows);
    ASSERT_NE(cuda, nullptr);
    ASSERT_NE(cpu, nullptr);
    EXPECT_EQ(cuda->name(), "cuda");
    Uniform rand(seed++);
    // Three calls: eager, captured into a graph, replayed; each on fresh
    // parameters and data, so a graph holding stale inputs would fail.
    for (int call = 0; call < 3; ++call) {
      SCOPED_TRACE("call " + std::to_string(call));
      const std::vector<float> params = RandomParams(model, rand, bf16_exact);
      const OwnedBatch data = RandomBatch(model, c.rows, rand, bf16_exact);
      ExpectStepMatchesCpu(model, *cuda, *cpu, params, data.batch, tol);
    }
  }
}

TEST(CudaBackendTest, Fp32StepMatchesCpu) {
  SKIP_WITHOUT_GPU();
  CheckModels({{"mlp:784-256-128-10", LossKind::kSoftmaxCrossEntropy, 128},
               {"mlp:20-64-33-7", LossKind::kMeanSquaredError, 50},
               {"mlp:300-40-12", LossKind::kSoftmaxCrossEntropy, 1},
               {"mlp:5-600-3", LossKind::kSoftmaxCrossEntropy, 77},
               {"linear:10-1", LossKind::kMeanSquaredError, 17},
               {"linear:6-4", LossKind::kSoftmaxCrossEntropy, 9}},
              GemmPrecision::kF32, kF32Tol, /*bf16_exact=*/false);
}

TEST(CudaBackendTest, Bf16StepMatchesCpu) {
  SKIP_WITHOUT_GPU();
  CheckModels({{"mlp:784-256-10", LossKind::kSoftmaxCrossEntropy, 128},
               {"mlp:40-96-5", LossKind::kMeanSquaredError, 64},
               {"mlp:784-256-128-10", LossKind::kSoftmaxCrossEntropy, 128},
               {"mlp:20-64-33-7", LossKind::kMeanSquaredError, 50},
               {"linear:10-3", LossKind::kMeanSquaredError, 17}},
              GemmPrecision::kBf16, kBf16Tol, /*bf16_exact=*/true);
}

TEST(CudaBackendTest, Tf32StepMatchesCpu) {
  SKIP_WITHOUT_GPU();
  CheckModels({{"mlp:784-256-10", LossKind::kSoftmaxCrossEntropy, 128},
               {"mlp:20-64-33-7", LossKind::kMeanSquaredError, 50}},
              GemmPrecision::kTf32, kTf32Tol, /*bf16_exact=*/true);
}

TEST(CudaBackendTest, RowCountChangesRecaptureAndEvaluateInterleaves) {
  SKIP_WITHOUT_GPU();
  const ModelSpec model = Parse("mlp:30-50-20-6", LossKind::kSoftmaxCrossEntropy);
  std::unique_ptr<GradientBackend> cuda = MakeCuda(model, 64, GemmPrecision::kF32);
  std::unique_ptr<GradientBackend> cpu = MakeCpu(model, 64);
  ASSERT_NE(cuda, nullptr);
  ASSERT_NE(cpu, nullptr);
  Uniform rand(41);
  for (const int64_t rows : {64, 64, 64, 31, 31, 31, 64, 64, 1, 1, 64}) {
    SCOPED_TRACE("rows " + std::to_string(rows));
    const std::vector<float> params = RandomParams(model, rand);
    const OwnedBatch data = RandomBatch(model, rows, rand);
    ExpectStepMatchesCpu(model, *cuda, *cpu, params, data.batch, kF32Tol);
    // Evaluate shares the activation buffers with the captured step.
    absl::StatusOr<EvalResult> eval = cuda->Evaluate(params, data.batch);
    absl::StatusOr<EvalResult> cpu_eval = cpu->Evaluate(params, data.batch);
    ASSERT_TRUE(eval.ok()) << eval.status();
    ASSERT_TRUE(cpu_eval.ok()) << cpu_eval.status();
    EXPECT_EQ(eval->count, rows);
    EXPECT_EQ(eval->correct, cpu_eval->correct);
    EXPECT_NEAR(eval->loss_sum, cpu_eval->loss_sum, 1e-5 * std::max(1.0, cpu_eval->loss_sum));
  }
}

TEST(CudaBackendTest, EvaluateMatchesCpu) {
  SKIP_WITHOUT_GPU();
  Uniform rand(51);
  for (const LossKind loss : {LossKind::kSoftmaxCrossEntropy, LossKind::kMeanSquaredError}) {
    const ModelSpec model = Parse("mlp:784-256-128-10", loss);
    for (const GemmPrecision precision : {GemmPrecision::kF32, GemmPrecision::kBf16}) {
      SCOPED_TRACE(std::string(GemmPrecisionName(precision)));
      const bool bf16 = precision == GemmPrecision::kBf16;
      std::unique_ptr<GradientBackend> cuda = MakeCuda(model, 500, precision);
      std::unique_ptr<GradientBackend> cpu = MakeCpu(model, 500);
      ASSERT_NE(cuda, nullptr);
      ASSERT_NE(cpu, nullptr);
      const std::vector<float> params = RandomParams(model, rand, bf16);
      const OwnedBatch data = RandomBatch(model, 500, rand, bf16);
      absl::StatusOr<EvalResult> eval = cuda->Evaluate(params, data.batch);
      absl::StatusOr<EvalResult> cpu_eval = cpu->Evaluate(params, data.batch);
      ASSERT_TRUE(eval.ok()) << eval.status();
      ASSERT_TRUE(cpu_eval.ok()) << cpu_eval.status();
      EXPECT_EQ(eval->count, 500);
      EXPECT_NEAR(eval->loss_sum, cpu_eval->loss_sum, (bf16 ? 2e-3 : 1e-5) * cpu_eval->loss_sum);
      if (loss == LossKind::kMeanSquaredError) {
        EXPECT_EQ(eval->correct, 0);
      } else if (bf16) {
        // Near-ties of the top two logits may resolve differently.
        EXPECT_NEAR(eval->correct, cpu_eval->correct, 10);
      } else {
        EXPECT_EQ(eval->correct, cpu_eval->correct);
      }
    }
  }
}

TEST(CudaBackendTest, BadInputsRejectedAndGradsUntouched) {
  SKIP_WITHOUT_GPU();
  const ModelSpec model = Parse("mlp:3-4-2", LossKind::kSoftmaxCrossEntropy);
  std::unique_ptr<GradientBackend> backend = MakeCuda(model, 4, GemmPrecision::kF32);
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
  const std::vector<Case> cases = {
      {"too many rows", {good.features, 5, good.labels, nullptr}, n, n, "max_batch"},
      {"zero rows", {good.features, 0, good.labels, nullptr}, n, n, "batch rows 0"},
      {"label too big", {good.features, 4, bad_labels.data(), nullptr}, n, n, "label 2 at row 2"},
      {"negative label",
       {good.features, 4, negative_labels.data(), nullptr},
       n,
       n,
       "label -1 at row 0"},
      {"null features", {nullptr, 4, good.labels, nullptr}, n, n, "features is null"},
      {"null labels", {good.features, 4, nullptr, nullptr}, n, n, "labels is null"},
      {"short params", good, n - 1, n, "params has"},
      {"long grads", good, n, n + 1, "grads has"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    std::vector<float> p(params.begin(), params.end());
    p.resize(c.params_size);
    std::vector<float> grads(c.grads_size, 7.0f);
    absl::StatusOr<float> loss = backend->ComputeGradients(p, c.batch, absl::MakeSpan(grads));
    ASSERT_FALSE(loss.ok());
    EXPECT_EQ(loss.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(loss.status().message(), c.expected)) << loss.status();
    EXPECT_TRUE(std::all_of(grads.begin(), grads.end(), [](float g) { return g == 7.0f; }));
    if (c.grads_size == n) {
      EXPECT_EQ(backend->Evaluate(p, c.batch).status().code(), absl::StatusCode::kInvalidArgument);
    }
  }
  // Mean squared error needs targets.
  const ModelSpec mse = Parse("linear:3-2", LossKind::kMeanSquaredError);
  std::unique_ptr<GradientBackend> mse_backend = MakeCuda(mse, 4, GemmPrecision::kF32);
  ASSERT_NE(mse_backend, nullptr);
  std::vector<float> mse_grads(mse.total_params(), 7.0f);
  const std::vector<float> mse_params = RandomParams(mse, rand);
  absl::StatusOr<float> mse_loss = mse_backend->ComputeGradients(
      mse_params, Batch{good.features, 4, good.labels, nullptr}, absl::MakeSpan(mse_grads));
  EXPECT_EQ(mse_loss.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(mse_loss.status().message(), "targets is null"));

  // The backend still works after rejecting bad input.
  std::unique_ptr<GradientBackend> cpu = MakeCpu(model, 4);
  ASSERT_NE(cpu, nullptr);
  ExpectStepMatchesCpu(model, *backend, *cpu, params, good, kF32Tol);
}

TEST(CudaBackendTest, CreateRejectsBadArguments) {
  SKIP_WITHOUT_GPU();
  const ModelSpec model = Parse("mlp:3-4-2", LossKind::kSoftmaxCrossEntropy);
  EXPECT_EQ(CreateCudaBackend(model, 0, GemmPrecision::kF32).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CreateCudaBackend(model, int64_t{1} << 40, GemmPrecision::kF32).status().code(),
            absl::StatusCode::kInvalidArgument);
  ModelSpec broken = model;
  broken.params.pop_back();
  EXPECT_EQ(CreateCudaBackend(broken, 8, GemmPrecision::kF32).status().code(),
            absl::StatusCode::kInvalidArgument);
  broken = model;
  broken.params[2].shape = {2, 5};
  EXPECT_TRUE(absl::StrContains(
      CreateCudaBackend(broken, 8, GemmPrecision::kF32).status().message(), "fc1.weight"));
}

TEST(CudaBackendTest, FactoryPicksCuda) {
  SKIP_WITHOUT_GPU();
  const ModelSpec model = Parse("mlp:3-4-2", LossKind::kSoftmaxCrossEntropy);
  for (const std::string device : {"cuda", "auto"}) {
    for (const std::string precision : {"fp32", "tf32", "bf16"}) {
      absl::StatusOr<std::unique_ptr<GradientBackend>> backend =
          CreateBackend(device, model, 8, precision);
      ASSERT_TRUE(backend.ok()) << device << " " << backend.status();
      EXPECT_EQ((*backend)->name(), "cuda");
    }
  }
  absl::StatusOr<std::unique_ptr<GradientBackend>> cpu = CreateBackend("cpu", model, 8, "bf16");
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_EQ((*cpu)->name(), "cpu");
}

// ---------------------------------------------------------------------------
// Behaviour that needs no GPU.

TEST(CudaBackendNoGpuTest, ParseGemmPrecision) {
  EXPECT_EQ(*ParseGemmPrecision("fp32"), GemmPrecision::kF32);
  EXPECT_EQ(*ParseGemmPrecision("tf32"), GemmPrecision::kTf32);
  EXPECT_EQ(*ParseGemmPrecision("bf16"), GemmPrecision::kBf16);
  for (const GemmPrecision p : {GemmPrecision::kF32, GemmPrecision::kTf32, GemmPrecision::kBf16}) {
    EXPECT_EQ(*ParseGemmPrecision(GemmPrecisionName(p)), p);
  }
  absl::StatusOr<GemmPrecision> bad = ParseGemmPrecision("fp16");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(bad.status().message(), "'fp16'"));
  const ModelSpec model = Parse("mlp:3-4-2", LossKind::kSoftmaxCrossEntropy);
  EXPECT_EQ(CreateBackend("cpu", model, 8, "fp16").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(CudaBackendNoGpuTest, MissingDeviceIsAClearError) {
  if (CudaDeviceAvailable()) GTEST_SKIP() << "a CUDA device is present";
  const absl::Status visible = CheckCudaDevice();
  EXPECT_EQ(visible.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(visible.message(), "no CUDA device is visible (cudaGetDeviceCount"))
      << visible;
  const ModelSpec model = Parse("mlp:3-4-2", LossKind::kSoftmaxCrossEntropy);
  EXPECT_EQ(CreateCudaBackend(model, 8, GemmPrecision::kF32).status().code(),
            absl::StatusCode::kFailedPrecondition);
  absl::StatusOr<std::unique_ptr<GradientBackend>> cuda = CreateBackend("cuda", model, 8);
  EXPECT_EQ(cuda.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StartsWith(cuda.status().message(), "--device=cuda: no CUDA device is visible"))
      << cuda.status();
  absl::StatusOr<std::unique_ptr<GradientBackend>> fallback =
      CreateBackend("auto", model, 8, "bf16");
  ASSERT_TRUE(fallback.ok()) << fallback.status();
  EXPECT_EQ((*fallback)->name(), "cpu");
}

}  // namespace
}  // namespace tessera
