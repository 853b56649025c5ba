// CUDA implementation of GradientBackend: cuBLAS for the matrix products,
// the small kernels of kernels.cuh for bias, activations and losses. It
// computes the same function as the CPU backend (cpu_backend.h) over the same
// flat parameter layout. This header needs no CUDA headers.

#ifndef TESSERA_WORKER_CUDA_CUDA_BACKEND_H_
#define TESSERA_WORKER_CUDA_CUDA_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/model_spec.h"
#include "worker/gradient_backend.h"

namespace tessera {

// Arithmetic of the matrix products. Everything else (bias, activations,
// losses, bias gradients, the parameters themselves) stays in fp32.
enum class GemmPrecision {
  kF32,   // fp32 inputs, fp32 math: matches the CPU backend to ~1e-5.
  kTf32,  // fp32 inputs, TF32 tensor cores (10-bit mantissa products).
  kBf16,  // bf16 copies of weights, inputs and deltas; fp32 accumulation and
          // output. The fp32 parameters remain the master copy.
};

// "fp32", "tf32" or "bf16"; kInvalidArgument naming the text otherwise.
absl::StatusOr<GemmPrecision> ParseGemmPrecision(std::string_view text);

// The inverse of ParseGemmPrecision.
std::string_view GemmPrecisionName(GemmPrecision precision);

// OK if the CUDA runtime sees at least one device; otherwise
// kFailedPrecondition "no CUDA device is visible (cudaGetDeviceCount: ...)"
// with the runtime's reason. Cheap enough to call before every decision.
absl::Status CheckCudaDevice();

// CheckCudaDevice().ok().
bool CudaDeviceAvailable();

// Returns a backend for `model` on the current CUDA device that accepts
// batches of 1..max_batch rows. All device memory (parameters, gradients,
// activations and deltas for max_batch rows, cuBLAS workspace) and the pinned
// host staging buffers for parameters, gradients and batches are allocated
// here; calls allocate nothing.
//
// Each ComputeGradients call stages the parameters and the batch through
// pinned memory to the device on a copy stream, runs forward and backward on
// a compute stream, and copies the gradients back in chunks, overlapping the
// device-to-host copies with the copies into `grads`. From the second call
// with the same number of rows on, the device work of a step is replayed
// from a CUDA graph captured for that row count (captured again when the row
// count changes); if capture is not possible it keeps launching eagerly.
// Evaluate always launches eagerly.
//
// Errors: kInvalidArgument for bad input, as the GradientBackend contract
// says, with `grads` untouched. A CUDA or cuBLAS failure returns kInternal
// (kResourceExhausted for out-of-memory) with the runtime's message; `grads`
// is then unspecified, and after a device fault the backend is unusable.
// Creation returns kFailedPrecondition without a device or when the device
// cannot run `precision` (tf32 and bf16 need compute capability 8.0), and
// kInvalidArgument for a bad max_batch or an inconsistent model.
//
// Not thread-safe: one instance per worker thread. Several instances may
// share a device.
absl::StatusOr<std::unique_ptr<GradientBackend>> CreateCudaBackend(const ModelSpec& model,
                                                                   int64_t max_batch,
                                                                   GemmPrecision precision);

}  // namespace tessera

#endif  // TESSERA_WORKER_CUDA_CUDA_BACKEND_H_
