// The small kernels of the CUDA gradient backend. Only CUDA headers here: no
// Eigen, protobuf or Abseil, so nvcc stays fast and quiet.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "worker/cuda/kernels.cuh"

namespace tessera {
namespace cuda_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kThreads / kWarp;
// Grid-stride loops cover the rest; enough blocks to fill any current GPU.
constexpr int64_t kMaxBlocks = 4096;
constexpr unsigned kFullMask = 0xffffffffu;

int BlocksFor(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

int WarpBlocksFor(int64_t rows) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

__device__ __forceinline__ uint16_t ToBf16Bits(float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// One block per row (grid-strided); threads walk the columns, so reads and
// writes are coalesced for wide layers.
__global__ void BiasActivationKernel(float* z, const float* bias, int64_t rows, int64_t cols,
                                     bool relu, uint16_t* z_bf16) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float* row = z + r * cols;
    uint16_t* row_bf16 = z_bf16 != nullptr ? z_bf16 + r * cols : nullptr;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      float v = row[j] + bias[j];
      if (relu) v = fmaxf(v, 0.0f);
      row[j] = v;
      if (row_bf16 != nullptr) row_bf16[j] = ToBf16Bits(v);
    }
  }
}

__global__ void ReluBackwardKernel(float* da, const float* act, int64_t n, uint16_t* da_bf16) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    // The stored activation is the ReLU output: positive exactly where the
    // derivative is 1.
    const float v = act[i] > 0.0f ? da[i] : 0.0f;
    da[i] = v;
    if (da_bf16 != nullptr) da_bf16[i] = ToBf16Bits(v);
  }
}

// One warp per row: output widths are usually small (10 classes), and a warp
// needs no shared memory or block-wide barriers.
__global__ void SoftmaxCrossEntropyKernel(const float* logits, const int32_t* labels, int64_t rows,
                                          int64_t cols, float* row_loss, int32_t* row_correct,
                                          float* dlogits) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       r < rows; r += warps) {
    const float* z = logits + r * cols;
    // Maximum and the first index holding it. Each lane scans ascending
    // columns and keeps its first maximum; the reduction breaks ties toward
    // the lower index, as the CPU backend's strict '>' scan does.
    float best = -FLT_MAX;
    int64_t best_j = cols;
    for (int64_t j = lane; j < cols; j += kWarp) {
      const float v = z[j];
      if (best_j == cols || v > best) {
        best = v;
        best_j = j;
      }
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(kFullMask, best, offset);
      const int64_t other_j = __shfl_xor_sync(kFullMask, best_j, offset);
      if (other_j != cols &&
          (best_j == cols || other > best || (other == best && other_j < best_j))) {
        best = other;
        best_j = other_j;
      }
    }
    float sum = 0.0f;
    for (int64_t j = lane; j < cols; j += kWarp) sum += expf(z[j] - best);
    sum = WarpSum(sum);
    const float log_sum = logf(sum);
    const int32_t label = labels[r];
    if (lane == 0) {
      row_loss[r] = log_sum - (z[label] - best);
      if (row_correct != nullptr) row_correct[r] = best_j == label ? 1 : 0;
    }
    if (dlogits != nullptr) {
      const float inv_rows = 1.0f / static_cast<float>(rows);
      float* d = dlogits + r * cols;
      for (int64_t j = lane; j < cols; j += kWarp) {
        float g = expf(z[j] - best - log_sum) * inv_rows;
        if (j == label) g -= inv_rows;
        d[j] = g;
      }
    }
  }
}

__global__ void MeanSquaredErrorKernel(const float* out, const float* targets, int64_t rows,
                                       int64_t cols, float* row_loss, float* dout) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const float scale = 2.0f / static_cast<float>(rows * cols);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       r < rows; r += warps) {
    const float* o = out + r * cols;
    const float* t = targets + r * cols;
    float sum = 0.0f;
    for (int64_t j = lane; j < cols; j += kWarp) {
      const float diff = o[j] - t[j];
      sum += diff * diff;
      if (dout != nullptr) dout[r * cols + j] = scale * diff;
    }
    sum = WarpSum(sum);
    if (lane == 0) row_loss[r] = sum / static_cast<float>(cols);
  }
}

__global__ void ReduceLossKernel(const float* row_loss, const int32_t* row_correct, int64_t rows,
                                 LossTotals* totals) {
  __shared__ double loss[kThreads];
  __shared__ long long correct[kThreads];
  double l = 0.0;
  long long c = 0;
  for (int64_t r = threadIdx.x; r < rows; r += kThreads) {
    l += row_loss[r];
    if (row_correct != nullptr) c += row_correct[r];
  }
  loss[threadIdx.x] = l;
  correct[threadIdx.x] = c;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      loss[threadIdx.x] += loss[threadIdx.x + half];
      correct[threadIdx.x] += correct[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    totals->loss_sum = loss[0];
    totals->correct = correct[0];
  }
}

// Block (32 x 8): 32 adjacent columns per block, 8 row lanes each summing a
// strided subset of rows, then a fixed-order reduction over the 8 lanes.
constexpr int kColTile = 32;
constexpr int kRowLanes = 8;

__global__ void ColumnSumsKernel(const float* m, int64_t rows, int64_t cols, float* out) {
  __shared__ float partial[kRowLanes][kColTile + 1];
  for (int64_t tile = blockIdx.x; tile * kColTile < cols; tile += gridDim.x) {
    const int64_t j = tile * kColTile + threadIdx.x;
    float sum = 0.0f;
    if (j < cols) {
      for (int64_t r = threadIdx.y; r < rows; r += kRowLanes) {
        sum += m[r * cols + j];
      }
    }
    partial[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && j < cols) {
      float total = 0.0f;
      for (int y = 0; y < kRowLanes; ++y) total += partial[y][threadIdx.x];
      out[j] = total;
    }
    __syncthreads();
  }
}

__global__ void F32ToBf16Kernel(const float* in, uint16_t* out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    out[i] = ToBf16Bits(in[i]);
  }
}

__global__ void Bf16ToF32Kernel(const uint16_t* in, float* out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    out[i] = __bfloat162float(__ushort_as_bfloat16(in[i]));
  }
}

}  // namespace

cudaError_t LaunchBiasActivation(float* z, const float* bias, int64_t rows, int64_t cols, bool relu,
                                 uint16_t* z_bf16, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  const int threads =
      cols >= kThreads ? kThreads : static_cast<int>((cols + kWarp - 1) / kWarp * kWarp);
  const int blocks = static_cast<int>(rows < kMaxBlocks ? rows : kMaxBlocks);
  BiasActivationKernel<<<blocks, threads, 0, stream>>>(z, bias, rows, cols, relu, z_bf16);
  return cudaGetLastError();
}

cudaError_t LaunchReluBackward(float* da, const float* act, int64_t n, uint16_t* da_bf16,
                               cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  ReluBackwardKernel<<<BlocksFor(n), kThreads, 0, stream>>>(da, act, n, da_bf16);
  return cudaGetLastError();
}

cudaError_t LaunchSoftmaxCrossEntropy(const float* logits, const int32_t* labels, int64_t rows,
                                      int64_t cols, float* row_loss, int32_t* row_correct,
                                      float* dlogits, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  SoftmaxCrossEntropyKernel<<<WarpBlocksFor(rows), kThreads, 0, stream>>>(
      logits, labels, rows, cols, row_loss, row_correct, dlogits);
  return cudaGetLastError();
}

cudaError_t LaunchMeanSquaredError(const float* out, const float* targets, int64_t rows,
                                   int64_t cols, float* row_loss, float* dout,
                                   cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  MeanSquaredErrorKernel<<<WarpBlocksFor(rows), kThreads, 0, stream>>>(out, targets, rows, cols,
                                                                       row_loss, dout);
  return cudaGetLastError();
}

cudaError_t LaunchReduceLoss(const float* row_loss, const int32_t* row_correct, int64_t rows,
                             LossTotals* totals, cudaStream_t stream) {
  ReduceLossKernel<<<1, kThreads, 0, stream>>>(row_loss, row_correct, rows < 0 ? 0 : rows, totals);
  return cudaGetLastError();
}

cudaError_t LaunchColumnSums(const float* m, int64_t rows, int64_t cols, float* out,
                             cudaStream_t stream) {
  if (cols <= 0) return cudaSuccess;
  const int64_t tiles = (cols + kColTile - 1) / kColTile;
  const int blocks = static_cast<int>(tiles < kMaxBlocks ? tiles : kMaxBlocks);
  ColumnSumsKernel<<<blocks, dim3(kColTile, kRowLanes), 0, stream>>>(m, rows < 0 ? 0 : rows, cols,
                                                                     out);
  return cudaGetLastError();
}

cudaError_t LaunchF32ToBf16(const float* in, uint16_t* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  F32ToBf16Kernel<<<BlocksFor(n), kThreads, 0, stream>>>(in, out, n);
  return cudaGetLastError();
}

cudaError_t LaunchBf16ToF32(const uint16_t* in, float* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  Bf16ToF32Kernel<<<BlocksFor(n), kThreads, 0, stream>>>(in, out, n);
  return cudaGetLastError();
}

}  // namespace cuda_kernels
}  // namespace tessera
