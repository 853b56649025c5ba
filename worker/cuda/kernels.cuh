// Host-side launchers for the small CUDA kernels of the CUDA gradient backend:
// everything the backend does on the device except matrix products, which go
// through cuBLAS. This is the narrow, C-style boundary between host C++ (which
// may use Abseil and the rest of the project) and kernels.cu (which includes
// only CUDA headers); tests call it directly to check each op in isolation.
//
// Conventions for every launcher:
// - Matrices are row-major, `rows` x `cols`, densely packed.
// - Work is enqueued on `stream` and the launch error is returned
//   (cudaGetLastError after the launch); nothing synchronizes, so execution
//   errors surface at the caller's next synchronizing call. Launchers are
//   safe to call while `stream` is being captured into a CUDA graph.
// - A zero-sized input enqueues nothing and returns cudaSuccess.
// - bf16 buffers are passed as uint16_t holding the raw bfloat16 bits, so this
//   header needs no CUDA half-precision types.
// - Inputs that the host must validate (labels in range, sizes within
//   int32 for cuBLAS) are not checked again here.

#ifndef TESSERA_WORKER_CUDA_KERNELS_CUH_
#define TESSERA_WORKER_CUDA_KERNELS_CUH_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace tessera {
namespace cuda_kernels {

// Sums over the rows of one batch, written by LaunchReduceLoss.
struct LossTotals {
  double loss_sum;  // sum of per-row losses
  int64_t correct;  // rows whose argmax equals the label (0 without labels)
};

// z[r][j] = act(z[r][j] + bias[j]) in place, act = max(., 0) when `relu`,
// identity otherwise. If `z_bf16` is non-null it also receives the result
// rounded to bf16 (round to nearest even).
cudaError_t LaunchBiasActivation(float* z, const float* bias, int64_t rows, int64_t cols, bool relu,
                                 uint16_t* z_bf16, cudaStream_t stream);

// ReLU backward through a stored ReLU output: da[i] = 0 where act[i] <= 0,
// unchanged elsewhere, for n elements. If `da_bf16` is non-null it also
// receives the result rounded to bf16.
cudaError_t LaunchReluBackward(float* da, const float* act, int64_t n, uint16_t* da_bf16,
                               cudaStream_t stream);

// Softmax cross-entropy over `logits` (rows x cols), numerically stable
// (shifted by the row maximum). Per row r with label y = labels[r]:
//   row_loss[r]    = log(sum_j exp(z_j - max)) - (z_y - max)
//   row_correct[r] = 1 if the first index of the row maximum is y, else 0
//   dlogits[r][j]  = (softmax(z)_j - [j == y]) / rows        (if non-null)
// `labels` must be in [0, cols).
cudaError_t LaunchSoftmaxCrossEntropy(const float* logits, const int32_t* labels, int64_t rows,
                                      int64_t cols, float* row_loss, int32_t* row_correct,
                                      float* dlogits, cudaStream_t stream);

// Mean squared error pieces over `out` and `targets` (rows x cols):
//   row_loss[r]  = sum_j (out - target)^2 / cols
//   dout[r][j]   = 2 (out - target) / (rows * cols)                (if non-null)
// so the sum of row_loss over rows divided by rows is the mean over all
// elements, and dout is its gradient.
cudaError_t LaunchMeanSquaredError(const float* out, const float* targets, int64_t rows,
                                   int64_t cols, float* row_loss, float* dout, cudaStream_t stream);

// totals->loss_sum = sum of row_loss[0, rows) (accumulated in double);
// totals->correct = sum of row_correct[0, rows), or 0 if row_correct is null.
// Deterministic: one block, fixed summation order. rows may be 0.
cudaError_t LaunchReduceLoss(const float* row_loss, const int32_t* row_correct, int64_t rows,
                             LossTotals* totals, cudaStream_t stream);

// out[j] = sum over r of m[r][j], for the bias gradient of a layer.
// Deterministic (fixed summation order). Writes all `cols` outputs, zeros
// when rows is 0.
cudaError_t LaunchColumnSums(const float* m, int64_t rows, int64_t cols, float* out,
                             cudaStream_t stream);

// out[i] = bf16(in[i]) for n elements, round to nearest even.
cudaError_t LaunchF32ToBf16(const float* in, uint16_t* out, int64_t n, cudaStream_t stream);

// out[i] = float(in[i]) for n elements (exact).
cudaError_t LaunchBf16ToF32(const uint16_t* in, float* out, int64_t n, cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace tessera

#endif  // TESSERA_WORKER_CUDA_KERNELS_CUH_
