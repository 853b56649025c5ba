// Picks the gradient backend for --device. The only place that knows which
// implementations were built.

#ifndef TESSERA_WORKER_BACKEND_FACTORY_H_
#define TESSERA_WORKER_BACKEND_FACTORY_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/model_spec.h"
#include "worker/gradient_backend.h"

namespace tessera {

// `device` is "cpu", "cuda" or "auto" (CUDA when built with it and a GPU is
// present, else CPU). kInvalidArgument for another name; kFailedPrecondition
// for "cuda" when no usable GPU or no CUDA support is built in.
// `gemm_precision` ("fp32", "tf32" or "bf16") sets the arithmetic of the CUDA
// backend's matrix products; it is validated for every device and has no
// effect on the CPU backend, which always uses fp32.
absl::StatusOr<std::unique_ptr<GradientBackend>> CreateBackend(
    const std::string& device, const ModelSpec& model, int64_t max_batch,
    const std::string& gemm_precision = "fp32");

}  // namespace tessera

#endif  // TESSERA_WORKER_BACKEND_FACTORY_H_
