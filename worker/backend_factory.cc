#include "worker/backend_factory.h"

#include "absl/strings/str_cat.h"
#include "worker/cpu_backend.h"

#if TESSERA_WITH_CUDA
#include "worker/cuda/cuda_backend.h"
#endif

namespace tessera {

absl::StatusOr<std::unique_ptr<GradientBackend>> CreateBackend(const std::string& device,
                                                               const ModelSpec& model,
                                                               int64_t max_batch,
                                                               const std::string& gemm_precision) {
  // Checked for every device, so a typo fails the same way with or without
  // a GPU; the CPU backend itself always computes in fp32.
  if (gemm_precision != "fp32" && gemm_precision != "tf32" && gemm_precision != "bf16") {
    return absl::InvalidArgumentError(
        absl::StrCat("--gemm_precision: expected fp32, tf32 or bf16, got '", gemm_precision, "'"));
  }
  if (device == "cpu") return CreateCpuBackend(model, max_batch);
  if (device == "cuda" || device == "auto") {
#if TESSERA_WITH_CUDA
    const absl::Status visible = CheckCudaDevice();
    if (visible.ok()) {
      absl::StatusOr<GemmPrecision> precision = ParseGemmPrecision(gemm_precision);
      if (!precision.ok()) return precision.status();
      return CreateCudaBackend(model, max_batch, *precision);
    }
    if (device == "auto") return CreateCpuBackend(model, max_batch);
    return absl::FailedPreconditionError(absl::StrCat("--device=cuda: ", visible.message()));
#else
    if (device == "auto") return CreateCpuBackend(model, max_batch);
    return absl::FailedPreconditionError(
        "--device=cuda: this build has no CUDA support (configure with "
        "-DTESSERA_WITH_CUDA=ON on a machine with nvcc)");
#endif
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--device: expected cpu, cuda or auto, got '", device, "'"));
}

}  // namespace tessera
