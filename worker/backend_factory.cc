#include "worker/backend_factory.h"

#include "absl/strings/str_cat.h"
#include "worker/cpu_backend.h"

namespace tessera {

absl::StatusOr<std::unique_ptr<GradientBackend>> CreateBackend(
    const std::string& device, const ModelSpec& model, int64_t max_batch) {
  if (device == "cpu" || device == "auto") return CreateCpuBackend(model, max_batch);
  if (device == "cuda") {
    return absl::FailedPreconditionError(
        "--device=cuda: this build has no CUDA support (configure with "
        "-DTESSERA_WITH_CUDA=ON on a machine with nvcc)");
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--device: expected cpu, cuda or auto, got '", device, "'"));
}

}  // namespace tessera
