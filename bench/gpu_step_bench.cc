// gpu_step_bench: wall-clock time of one CUDA-backend ComputeGradients call
// (parameters in from host memory, gradients out to host memory, as a worker
// uses it), median over many calls after a warm-up.
//
// Usage: gpu_step_bench [RUNS]        (default 200)
// Prints one human-readable line and one "RESULT ..." line per case; the
// device script pairs the RESULT lines with bench/torch_gpu_step.py's.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/model_spec.h"
#include "worker/cuda/cuda_backend.h"

namespace {

struct Case {
  std::string spec;
  int64_t batch;
  tessera::GemmPrecision precision;
};

double Percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const size_t i = static_cast<size_t>(q * static_cast<double>(v.size() - 1) + 0.5);
  return v[i];
}

int Run(const Case& c, int runs) {
  absl::StatusOr<tessera::ModelSpec> model =
      tessera::ParseModelSpec(c.spec, tessera::LossKind::kSoftmaxCrossEntropy);
  if (!model.ok()) {
    std::cerr << "gpu_step_bench: " << model.status().message() << std::endl;
    return 1;
  }
  std::vector<float> params(model->total_params());
  const std::vector<int64_t> offsets = model->param_offsets();
  for (size_t i = 0; i < model->params.size(); ++i) {
    const tessera::ParamSpec& p = model->params[i];
    tessera::InitParameter(p, static_cast<int>(i), 42, 0, p.num_elements(),
                           params.data() + offsets[i]);
  }
  std::mt19937 rng(7);
  std::vector<float> features(c.batch * model->input_dim());
  for (float& x : features) x = static_cast<float>(rng() >> 8) * 0x1.0p-24f;
  std::vector<int32_t> labels(c.batch);
  for (int32_t& y : labels) {
    y = static_cast<int32_t>(rng() % model->output_dim());
  }
  std::vector<float> grads(params.size());
  const tessera::Batch batch{features.data(), c.batch, labels.data(), nullptr};

  absl::StatusOr<std::unique_ptr<tessera::GradientBackend>> backend =
      tessera::CreateCudaBackend(*model, c.batch, c.precision);
  if (!backend.ok()) {
    std::cerr << "gpu_step_bench: " << backend.status().message() << std::endl;
    return 1;
  }
  const int warmup = std::max(10, runs / 10);
  float loss = 0;
  std::vector<double> ms;
  for (int i = 0; i < warmup + runs; ++i) {
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<float> step = (*backend)->ComputeGradients(params, batch, absl::MakeSpan(grads));
    const auto end = std::chrono::steady_clock::now();
    if (!step.ok()) {
      std::cerr << "gpu_step_bench: " << step.status().message() << std::endl;
      return 1;
    }
    loss = *step;
    if (i >= warmup) {
      ms.push_back(std::chrono::duration<double, std::milli>(end - start).count());
    }
  }
  const std::string precision(tessera::GemmPrecisionName(c.precision));
  const double median = Percentile(ms, 0.5);
  std::cout << std::fixed << std::setprecision(3) << c.spec << " batch " << c.batch << " "
            << precision << ": " << median << " ms/step median (p10 " << Percentile(ms, 0.1)
            << ", p90 " << Percentile(ms, 0.9) << ", " << runs << " runs, " << model->total_params()
            << " params, loss " << loss << ")\n";
  std::cout << "RESULT tessera " << c.spec << " " << c.batch << " " << precision << " "
            << std::setprecision(4) << median << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const int runs = argc > 1 ? std::atoi(argv[1]) : 200;
  if (runs <= 0) {
    std::cerr << "usage: gpu_step_bench [RUNS > 0]" << std::endl;
    return 2;
  }
  const absl::Status visible = tessera::CheckCudaDevice();
  if (!visible.ok()) {
    std::cerr << "gpu_step_bench: " << visible.message() << std::endl;
    return 1;
  }
  using tessera::GemmPrecision;
  const std::vector<Case> cases = {
      {"mlp:784-256-128-10", 128, GemmPrecision::kF32},
      {"mlp:784-256-128-10", 128, GemmPrecision::kBf16},
      {"mlp:784-4096-4096-4096-10", 1024, GemmPrecision::kF32},
      {"mlp:784-4096-4096-4096-10", 1024, GemmPrecision::kTf32},
      {"mlp:784-4096-4096-4096-10", 1024, GemmPrecision::kBf16},
  };
  int failures = 0;
  for (const Case& c : cases) failures += Run(c, runs);
  return failures == 0 ? 0 : 1;
}
