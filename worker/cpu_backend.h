// Single-threaded Eigen implementation of GradientBackend.

#ifndef TESSERA_WORKER_CPU_BACKEND_H_
#define TESSERA_WORKER_CPU_BACKEND_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "common/model_spec.h"
#include "worker/gradient_backend.h"

namespace tessera {

// Returns a backend for `model` (as produced by ParseModelSpec) that accepts
// batches of 1..max_batch rows. All activation and gradient scratch space is
// allocated here and reused by every call (only Eigen's matrix product may
// take packing workspace from the heap for large layers); callers evaluating
// more than max_batch rows must split them into chunks. It runs on the
// calling thread only and starts no threads. Returns kInvalidArgument if
// max_batch is not positive, the scratch space would be unreasonably large,
// or `model` is internally inconsistent.
absl::StatusOr<std::unique_ptr<GradientBackend>> CreateCpuBackend(
    const ModelSpec& model, int64_t max_batch);

}  // namespace tessera

#endif  // TESSERA_WORKER_CPU_BACKEND_H_
