#include "worker/cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/cuda/kernels.cuh"

namespace tessera {
namespace {

namespace ck = cuda_kernels;

// Same cap as the CPU backend, so a typo in a flag cannot ask for terabytes.
constexpr int64_t kMaxScratchFloats = int64_t{1} << 32;
// Host<->device copies go in chunks of this size, so that the host-side copy
// between the caller's memory and the pinned staging buffer of one chunk
// overlaps the DMA of another.
constexpr size_t kCopyChunkBytes = size_t{4} << 20;
// cuBLAS gets its workspace up front: it must not allocate while a step is
// being captured into a graph. 32 MiB is what NVIDIA advises for Hopper.
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;

absl::Status CudaStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return absl::OkStatus();
  absl::StatusCode code = absl::StatusCode::kInternal;
  switch (error) {
    case cudaErrorMemoryAllocation:
      code = absl::StatusCode::kResourceExhausted;
      break;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice:
    case cudaErrorDevicesUnavailable:
      code = absl::StatusCode::kFailedPrecondition;
      break;
    default:
      break;
  }
  return absl::Status(code, absl::StrCat("CUDA: ", what, ": ", cudaGetErrorName(error), " (",
                                         cudaGetErrorString(error), ")"));
}

absl::Status CublasStatus(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  absl::StatusCode code = absl::StatusCode::kInternal;
  if (status == CUBLAS_STATUS_ALLOC_FAILED) {
    code = absl::StatusCode::kResourceExhausted;
  } else if (status == CUBLAS_STATUS_NOT_INITIALIZED || status == CUBLAS_STATUS_ARCH_MISMATCH) {
    code = absl::StatusCode::kFailedPrecondition;
  }
  return absl::Status(code, absl::StrCat("cuBLAS: ", what, ": ", cublasGetStatusName(status), " (",
                                         cublasGetStatusString(status), ")"));
}

#define TESSERA_CUDA_RETURN_IF_ERROR(expr, what) TESSERA_RETURN_IF_ERROR(CudaStatus((expr), (what)))
#define TESSERA_CUBLAS_RETURN_IF_ERROR(expr, what) \
  TESSERA_RETURN_IF_ERROR(CublasStatus((expr), (what)))

struct Layer {
  int64_t in = 0;
  int64_t out = 0;
  int64_t weight_offset = 0;
  int64_t bias_offset = 0;
};

class CudaBackend final : public GradientBackend {
 public:
  CudaBackend(std::vector<Layer> layers, LossKind loss, int64_t total_params, int64_t max_batch,
              GemmPrecision precision, int device)
      : layers_(std::move(layers)),
        loss_(loss),
        total_params_(total_params),
        max_batch_(max_batch),
        precision_(precision),
        device_(device) {}

  ~CudaBackend() override {
    // Nothing may be in flight when the buffers go; errors no longer matter.
    if (compute_ != nullptr) cudaStreamSynchronize(compute_);
    if (copy_ != nullptr) cudaStreamSynchronize(copy_);
    DestroyGraph();
    if (cublas_ != nullptr) cublasDestroy(cublas_);
    for (cudaEvent_t event : chunk_done_) cudaEventDestroy(event);
    if (uploaded_ != nullptr) cudaEventDestroy(uploaded_);
    if (computed_ != nullptr) cudaEventDestroy(computed_);
    if (compute_ != nullptr) cudaStreamDestroy(compute_);
    if (copy_ != nullptr) cudaStreamDestroy(copy_);
    for (void* p : device_allocs_) cudaFree(p);
    for (void* p : pinned_allocs_) cudaFreeHost(p);
    cudaGetLastError();
  }

  // Creates streams, events and the cuBLAS handle and allocates every
  // buffer. Called once, right after construction.
  absl::Status Init() {
    TESSERA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_), "select device");
    TESSERA_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&compute_, cudaStreamNonBlocking),
                                 "create compute stream");
    TESSERA_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&copy_, cudaStreamNonBlocking),
                                 "create copy stream");
    TESSERA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&uploaded_, cudaEventDisableTiming),
                                 "create event");
    TESSERA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&computed_, cudaEventDisableTiming),
                                 "create event");
    const size_t param_bytes = static_cast<size_t>(total_params_) * sizeof(float);
    const size_t chunks =
        std::max<size_t>(1, (param_bytes + kCopyChunkBytes - 1) / kCopyChunkBytes);
    for (size_t i = 0; i < chunks; ++i) {
      cudaEvent_t event = nullptr;
      TESSERA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&event, cudaEventDisableTiming),
                                   "create event");
      chunk_done_.push_back(event);
    }

    TESSERA_CUBLAS_RETURN_IF_ERROR(cublasCreate(&cublas_), "create handle");
    TESSERA_CUBLAS_RETURN_IF_ERROR(cublasSetStream(cublas_, compute_), "set stream");
    void* workspace = nullptr;
    TESSERA_RETURN_IF_ERROR(AllocDevice(&workspace, kCublasWorkspaceBytes, "cuBLAS workspace"));
    TESSERA_CUBLAS_RETURN_IF_ERROR(cublasSetWorkspace(cublas_, workspace, kCublasWorkspaceBytes),
                                   "set workspace");

    const bool bf16 = precision_ == GemmPrecision::kBf16;
    const int64_t in = input_dim();
    const int64_t out = output_dim();
    int64_t widest = 0;
    for (const Layer& layer : layers_) widest = std::max(widest, layer.out);

    TESSERA_RETURN_IF_ERROR(Alloc(&d_params_, total_params_, "parameters"));
    TESSERA_RETURN_IF_ERROR(Alloc(&d_grads_, total_params_, "gradients"));
    TESSERA_RETURN_IF_ERROR(Alloc(&d_features_, max_batch_ * in, "features"));
    if (loss_ == LossKind::kSoftmaxCrossEntropy) {
      TESSERA_RETURN_IF_ERROR(Alloc(&d_labels_, max_batch_, "labels"));
      TESSERA_RETURN_IF_ERROR(Alloc(&h_labels_, max_batch_, "labels", true));
    } else {
      TESSERA_RETURN_IF_ERROR(Alloc(&d_targets_, max_batch_ * out, "targets"));
      TESSERA_RETURN_IF_ERROR(Alloc(&h_targets_, max_batch_ * out, "targets", true));
    }
    for (size_t l = 0; l < layers_.size(); ++l) {
      float* act = nullptr;
      TESSERA_RETURN_IF_ERROR(Alloc(&act, max_batch_ * layers_[l].out, "activations"));
      d_act_.push_back(act);
      uint16_t* act_bf16 = nullptr;
      if (bf16 && l + 1 < layers_.size()) {
        TESSERA_RETURN_IF_ERROR(Alloc(&act_bf16, max_batch_ * layers_[l].out, "bf16 activations"));
      }
      d_act_bf16_.push_back(act_bf16);
    }
    TESSERA_RETURN_IF_ERROR(Alloc(&d_delta_, max_batch_ * widest, "deltas"));
    TESSERA_RETURN_IF_ERROR(Alloc(&d_delta_prev_, max_batch_ * widest, "deltas"));
    TESSERA_RETURN_IF_ERROR(Alloc(&d_row_loss_, max_batch_, "row losses"));
    TESSERA_RETURN_IF_ERROR(Alloc(&d_row_correct_, max_batch_, "row hits"));
    TESSERA_RETURN_IF_ERROR(Alloc(&d_totals_, 1, "loss totals"));
    if (bf16) {
      TESSERA_RETURN_IF_ERROR(Alloc(&d_params_bf16_, total_params_, "bf16 parameters"));
      TESSERA_RETURN_IF_ERROR(Alloc(&d_features_bf16_, max_batch_ * in, "bf16 features"));
      TESSERA_RETURN_IF_ERROR(Alloc(&d_delta_bf16_, max_batch_ * widest, "bf16 deltas"));
    }

    TESSERA_RETURN_IF_ERROR(Alloc(&h_params_, total_params_, "parameters", true));
    TESSERA_RETURN_IF_ERROR(Alloc(&h_grads_, total_params_, "gradients", true));
    TESSERA_RETURN_IF_ERROR(Alloc(&h_features_, max_batch_ * in, "features", true));
    TESSERA_RETURN_IF_ERROR(Alloc(&h_totals_, 1, "loss totals", true));
    return absl::OkStatus();
  }

  std::string_view name() const override { return "cuda"; }

  absl::StatusOr<float> ComputeGradients(absl::Span<const float> params, const Batch& batch,
                                         absl::Span<float> grads) override {
    if (grads.size() != static_cast<size_t>(total_params_)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "grads has ", grads.size(), " floats, model has ", total_params_, " parameters"));
    }
    TESSERA_RETURN_IF_ERROR(Validate(params, batch));
    const int64_t rows = batch.rows;
    TESSERA_RETURN_IF_ERROR(BeginCall());
    TESSERA_RETURN_IF_ERROR(Upload(params, batch));
    TESSERA_RETURN_IF_ERROR(RunStep(rows));
    TESSERA_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h_totals_, d_totals_, sizeof(ck::LossTotals),
                                                 cudaMemcpyDeviceToHost, compute_),
                                 "copy loss to host");
    TESSERA_CUDA_RETURN_IF_ERROR(cudaEventRecord(computed_, compute_), "record step end");
    TESSERA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(copy_, computed_, 0), "wait for step end");
    TESSERA_RETURN_IF_ERROR(
        CopyToHost(grads.data(), h_grads_, d_grads_, grads.size() * sizeof(float)));
    TESSERA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(compute_), "finish step");
    idle_ = true;
    return static_cast<float>(h_totals_->loss_sum / static_cast<double>(rows));
  }

  absl::StatusOr<EvalResult> Evaluate(absl::Span<const float> params, const Batch& batch) override {
    TESSERA_RETURN_IF_ERROR(Validate(params, batch));
    const int64_t rows = batch.rows;
    TESSERA_RETURN_IF_ERROR(BeginCall());
    TESSERA_RETURN_IF_ERROR(Upload(params, batch));
    TESSERA_RETURN_IF_ERROR(EnqueueForward(rows));
    TESSERA_RETURN_IF_ERROR(EnqueueLoss(rows, /*dz=*/nullptr));
    TESSERA_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h_totals_, d_totals_, sizeof(ck::LossTotals),
                                                 cudaMemcpyDeviceToHost, compute_),
                                 "copy loss to host");
    TESSERA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(compute_), "finish evaluation");
    idle_ = true;
    EvalResult result;
    result.loss_sum = h_totals_->loss_sum;
    result.correct =
        loss_ == LossKind::kSoftmaxCrossEntropy ? static_cast<int64_t>(h_totals_->correct) : 0;
    result.count = rows;
    return result;
  }

 private:
  int64_t input_dim() const { return layers_.front().in; }
  int64_t output_dim() const { return layers_.back().out; }
  bool bf16() const { return precision_ == GemmPrecision::kBf16; }

  // Device (pinned = false) or pinned host (pinned = true) memory for
  // `count` elements, freed by the destructor.
  template <typename T>
  absl::Status Alloc(T** ptr, int64_t count, const char* what, bool pinned = false) {
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T);
    void* p = nullptr;
    if (pinned) {
      TESSERA_RETURN_IF_ERROR(CudaStatus(
          cudaMallocHost(&p, bytes),
          absl::StrCat("allocate ", bytes, " bytes of pinned host memory for ", what).c_str()));
      pinned_allocs_.push_back(p);
    } else {
      TESSERA_RETURN_IF_ERROR(AllocDevice(&p, bytes, what));
    }
    *ptr = static_cast<T*>(p);
    return absl::OkStatus();
  }

  absl::Status AllocDevice(void** ptr, size_t bytes, const char* what) {
    TESSERA_RETURN_IF_ERROR(
        CudaStatus(cudaMalloc(ptr, bytes),
                   absl::StrCat("allocate ", bytes, " bytes of device memory for ", what).c_str()));
    device_allocs_.push_back(*ptr);
    return absl::OkStatus();
  }

  absl::Status Validate(absl::Span<const float> params, const Batch& batch) const {
    return ValidateBatch(loss_, total_params_, max_batch_, output_dim(), params, batch);
  }

  // A call that failed half-way may have left copies in flight that still
  // read the pinned buffers; wait for them before writing those buffers again.
  absl::Status BeginCall() {
    if (!idle_) {
      TESSERA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(copy_), "drain copy stream");
      TESSERA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(compute_), "drain compute stream");
    }
    idle_ = false;
    return absl::OkStatus();
  }

  // Copies `bytes` from pageable `src` through `pinned` to `dev` on the copy
  // stream, chunk by chunk, so each chunk's DMA overlaps the next memcpy.
  absl::Status CopyToDevice(void* dev, void* pinned, const void* src, size_t bytes) {
    for (size_t offset = 0; offset < bytes; offset += kCopyChunkBytes) {
      const size_t len = std::min(kCopyChunkBytes, bytes - offset);
      std::memcpy(static_cast<char*>(pinned) + offset, static_cast<const char*>(src) + offset, len);
      TESSERA_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(static_cast<char*>(dev) + offset, static_cast<char*>(pinned) + offset,
                          len, cudaMemcpyHostToDevice, copy_),
          "copy to device");
    }
    return absl::OkStatus();
  }

  // Copies `bytes` from `dev` through `pinned` into pageable `dst`: all DMA
  // chunks are queued on the copy stream first, then each is copied out as
  // soon as its event fires. Returns when `dst` is complete.
  absl::Status CopyToHost(void* dst, void* pinned, const void* dev, size_t bytes) {
    size_t chunks = 0;
    for (size_t offset = 0; offset < bytes; offset += kCopyChunkBytes) {
      const size_t len = std::min(kCopyChunkBytes, bytes - offset);
      TESSERA_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(static_cast<char*>(pinned) + offset,
                                                   static_cast<const char*>(dev) + offset, len,
                                                   cudaMemcpyDeviceToHost, copy_),
                                   "copy to host");
      TESSERA_CUDA_RETURN_IF_ERROR(cudaEventRecord(chunk_done_[chunks++], copy_), "record copy");
    }
    for (size_t i = 0; i < chunks; ++i) {
      const size_t offset = i * kCopyChunkBytes;
      const size_t len = std::min(kCopyChunkBytes, bytes - offset);
      TESSERA_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(chunk_done_[i]), "wait for copy to host");
      std::memcpy(static_cast<char*>(dst) + offset, static_cast<char*>(pinned) + offset, len);
    }
    return absl::OkStatus();
  }

  // Stages the parameters and the batch on the device and makes the compute
  // stream wait for them.
  absl::Status Upload(absl::Span<const float> params, const Batch& batch) {
    const int64_t rows = batch.rows;
    TESSERA_RETURN_IF_ERROR(
        CopyToDevice(d_features_, h_features_, batch.features, rows * input_dim() * sizeof(float)));
    if (loss_ == LossKind::kSoftmaxCrossEntropy) {
      TESSERA_RETURN_IF_ERROR(
          CopyToDevice(d_labels_, h_labels_, batch.labels, rows * sizeof(int32_t)));
    } else {
      TESSERA_RETURN_IF_ERROR(
          CopyToDevice(d_targets_, h_targets_, batch.targets, rows * output_dim() * sizeof(float)));
    }
    TESSERA_RETURN_IF_ERROR(
        CopyToDevice(d_params_, h_params_, params.data(), params.size() * sizeof(float)));
    TESSERA_CUDA_RETURN_IF_ERROR(cudaEventRecord(uploaded_, copy_), "record upload");
    TESSERA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(compute_, uploaded_, 0), "wait for upload");
    return absl::OkStatus();
  }

  // C (column-major m x n, fp32) = op(A) op(B), with A and B fp32 or bf16 as
  // precision_ says. Row-major callers pass their matrices as the transposes
  // cuBLAS sees (see EnqueueForward / EnqueueBackward).
  absl::Status Gemm(cublasOperation_t trans_a, cublasOperation_t trans_b, int64_t m, int64_t n,
                    int64_t k, const void* a, int64_t lda, const void* b, int64_t ldb, float* c,
                    int64_t ldc) {
    const float alpha = 1.0f;
    const float beta = 0.0f;
    const cudaDataType_t ab_type = bf16() ? CUDA_R_16BF : CUDA_R_32F;
    const cublasComputeType_t compute =
        precision_ == GemmPrecision::kTf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    TESSERA_CUBLAS_RETURN_IF_ERROR(
        cublasGemmEx(cublas_, trans_a, trans_b, static_cast<int>(m), static_cast<int>(n),
                     static_cast<int>(k), &alpha, a, ab_type, static_cast<int>(lda), b, ab_type,
                     static_cast<int>(ldb), &beta, c, CUDA_R_32F, static_cast<int>(ldc), compute,
                     CUBLAS_GEMM_DEFAULT),
        "gemm");
    return absl::OkStatus();
  }

  // The operand for layer l's input (the features or layer l-1's output) in
  // the GEMM precision.
  const void* GemmInput(size_t l) const {
    if (l == 0) {
      return bf16() ? static_cast<const void*>(d_features_bf16_) : d_features_;
    }
    return bf16() ? static_cast<const void*>(d_act_bf16_[l - 1]) : d_act_[l - 1];
  }

  const void* GemmWeight(const Layer& layer) const {
    if (bf16()) return d_params_bf16_ + layer.weight_offset;
    return d_params_ + layer.weight_offset;
  }

  // Fills d_act_[l] for every layer (post-ReLU on hidden layers, raw outputs
  // on the last), plus the bf16 copies the next GEMM reads.
  absl::Status EnqueueForward(int64_t rows) {
    if (bf16()) {
      for (const Layer& layer : layers_) {
        TESSERA_CUDA_RETURN_IF_ERROR(ck::LaunchF32ToBf16(d_params_ + layer.weight_offset,
                                                         d_params_bf16_ + layer.weight_offset,
                                                         layer.out * layer.in, compute_),
                                     "weights to bf16");
      }
      TESSERA_CUDA_RETURN_IF_ERROR(
          ck::LaunchF32ToBf16(d_features_, d_features_bf16_, rows * input_dim(), compute_),
          "features to bf16");
    }
    const size_t last = layers_.size() - 1;
    for (size_t l = 0; l <= last; ++l) {
      const Layer& layer = layers_[l];
      // Row-major Z (rows x out) = X (rows x in) W^T; column-major that is
      // Z^T (out x rows) = W X^T, where the row-major W buffer reads as
      // column-major W^T (in x out, ld in) and X as X^T (in x rows, ld in).
      TESSERA_RETURN_IF_ERROR(Gemm(CUBLAS_OP_T, CUBLAS_OP_N, layer.out, rows, layer.in,
                                   GemmWeight(layer), layer.in, GemmInput(l), layer.in, d_act_[l],
                                   layer.out));
      TESSERA_CUDA_RETURN_IF_ERROR(
          ck::LaunchBiasActivation(d_act_[l], d_params_ + layer.bias_offset, rows, layer.out,
                                   /*relu=*/l < last, d_act_bf16_[l], compute_),
          "bias and activation");
    }
    return absl::OkStatus();
  }

  // Per-row losses of the last layer's outputs, their totals in d_totals_,
  // and, if `dz` is non-null, d(mean loss)/d(outputs) into it.
  absl::Status EnqueueLoss(int64_t rows, float* dz) {
    const int64_t k = output_dim();
    if (loss_ == LossKind::kSoftmaxCrossEntropy) {
      TESSERA_CUDA_RETURN_IF_ERROR(
          ck::LaunchSoftmaxCrossEntropy(d_act_.back(), d_labels_, rows, k, d_row_loss_,
                                        d_row_correct_, dz, compute_),
          "softmax cross-entropy");
    } else {
      TESSERA_CUDA_RETURN_IF_ERROR(
          ck::LaunchMeanSquaredError(d_act_.back(), d_targets_, rows, k, d_row_loss_, dz, compute_),
          "mean squared error");
    }
    TESSERA_CUDA_RETURN_IF_ERROR(
        ck::LaunchReduceLoss(d_row_loss_,
                             loss_ == LossKind::kSoftmaxCrossEntropy ? d_row_correct_ : nullptr,
                             rows, d_totals_, compute_),
        "loss totals");
    return absl::OkStatus();
  }

  // Everything on the device for one ComputeGradients: forward, loss, and
  // backward into d_grads_. Contains no synchronization and no allocation,
  // so it can be captured into a graph.
  absl::Status EnqueueStep(int64_t rows) {
    TESSERA_RETURN_IF_ERROR(EnqueueForward(rows));
    float* delta = d_delta_;
    float* delta_prev = d_delta_prev_;
    TESSERA_RETURN_IF_ERROR(EnqueueLoss(rows, delta));
    if (bf16()) {
      TESSERA_CUDA_RETURN_IF_ERROR(
          ck::LaunchF32ToBf16(delta, d_delta_bf16_, rows * output_dim(), compute_),
          "deltas to bf16");
    }
    // `delta` holds dLoss/dZ of the current layer (rows x out, row-major),
    // d_delta_bf16_ its bf16 copy; `delta_prev` receives dLoss/dA of the
    // layer below.
    for (int64_t l = static_cast<int64_t>(layers_.size()) - 1; l >= 0; --l) {
      const Layer& layer = layers_[l];
      const void* dz = bf16() ? static_cast<const void*>(d_delta_bf16_) : delta;
      // Row-major dW (out x in) = dZ^T X; column-major dW^T (in x out) =
      // X^T dZ, with X^T the input buffer as is (in x rows, ld in) and dZ the
      // transpose of the delta buffer read column-major (out x rows, ld out).
      TESSERA_RETURN_IF_ERROR(Gemm(CUBLAS_OP_N, CUBLAS_OP_T, layer.in, layer.out, rows,
                                   GemmInput(l), layer.in, dz, layer.out,
                                   d_grads_ + layer.weight_offset, layer.in));
      TESSERA_CUDA_RETURN_IF_ERROR(
          ck::LaunchColumnSums(delta, rows, layer.out, d_grads_ + layer.bias_offset, compute_),
          "bias gradient");
      if (l == 0) break;
      // Row-major dA (rows x in) = dZ W; column-major dA^T (in x rows) =
      // W^T dZ^T, both operands being the buffers as they are.
      TESSERA_RETURN_IF_ERROR(Gemm(CUBLAS_OP_N, CUBLAS_OP_N, layer.in, rows, layer.out,
                                   GemmWeight(layer), layer.in, dz, layer.out, delta_prev,
                                   layer.in));
      // The layer below applied ReLU. The bf16 copy overwrites the one the
      // GEMM above read, which stream order makes safe.
      TESSERA_CUDA_RETURN_IF_ERROR(
          ck::LaunchReluBackward(delta_prev, d_act_[l - 1], rows * layer.in,
                                 bf16() ? d_delta_bf16_ : nullptr, compute_),
          "relu backward");
      std::swap(delta, delta_prev);
    }
    return absl::OkStatus();
  }

  void DestroyGraph() {
    if (graph_exec_ != nullptr) cudaGraphExecDestroy(graph_exec_);
    graph_exec_ = nullptr;
    graph_rows_ = 0;
  }

  // Captures EnqueueStep(rows) into graph_exec_.
  absl::Status CaptureStep(int64_t rows) {
    DestroyGraph();
    TESSERA_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(compute_, cudaStreamCaptureModeThreadLocal),
                                 "begin graph capture");
    const absl::Status enqueued = EnqueueStep(rows);
    cudaGraph_t graph = nullptr;
    const cudaError_t ended = cudaStreamEndCapture(compute_, &graph);
    absl::Status status = enqueued.ok() ? CudaStatus(ended, "end graph capture") : enqueued;
    if (status.ok()) {
      status = CudaStatus(cudaGraphInstantiate(&graph_exec_, graph, 0), "instantiate graph");
    }
    if (graph != nullptr) cudaGraphDestroy(graph);
    if (!status.ok()) {
      graph_exec_ = nullptr;
      cudaGetLastError();  // capture errors are not sticky; clear them
      return status;
    }
    graph_rows_ = rows;
    return absl::OkStatus();
  }

  // Runs the device part of a step: eagerly the first time a row count is
  // seen (which also lets cuBLAS load its kernels outside any capture), from
  // a graph captured on the second, and replaying that graph afterwards.
  absl::Status RunStep(int64_t rows) {
    if (graph_exec_ != nullptr && graph_rows_ == rows) {
      return CudaStatus(cudaGraphLaunch(graph_exec_, compute_), "launch step graph");
    }
    if (graphs_enabled_ && eager_rows_ == rows) {
      if (CaptureStep(rows).ok()) {
        return CudaStatus(cudaGraphLaunch(graph_exec_, compute_), "launch step graph");
      }
      // Capture is an optimization: without it the same work is launched
      // eagerly, and any real device error shows up there.
      graphs_enabled_ = false;
    }
    TESSERA_RETURN_IF_ERROR(EnqueueStep(rows));
    eager_rows_ = rows;
    return absl::OkStatus();
  }

  // Constant after construction.
  const std::vector<Layer> layers_;
  const LossKind loss_;
  const int64_t total_params_;
  const int64_t max_batch_;
  const GemmPrecision precision_;
  const int device_;

  // Created by Init(), released by the destructor.
  cudaStream_t compute_ = nullptr;
  cudaStream_t copy_ = nullptr;
  cudaEvent_t uploaded_ = nullptr;
  cudaEvent_t computed_ = nullptr;
  std::vector<cudaEvent_t> chunk_done_;  // one per gradient copy chunk
  cublasHandle_t cublas_ = nullptr;
  std::vector<void*> device_allocs_;
  std::vector<void*> pinned_allocs_;

  // Device buffers, sized for max_batch_ rows.
  float* d_params_ = nullptr;
  float* d_grads_ = nullptr;
  float* d_features_ = nullptr;
  int32_t* d_labels_ = nullptr;  // softmax cross-entropy only
  float* d_targets_ = nullptr;   // mean squared error only
  std::vector<float*> d_act_;    // per layer, rows x out
  float* d_delta_ = nullptr;
  float* d_delta_prev_ = nullptr;
  float* d_row_loss_ = nullptr;
  int32_t* d_row_correct_ = nullptr;
  ck::LossTotals* d_totals_ = nullptr;
  // bf16 GEMM operands (kBf16 only; null otherwise).
  uint16_t* d_params_bf16_ = nullptr;  // weights only; biases stay fp32
  uint16_t* d_features_bf16_ = nullptr;
  std::vector<uint16_t*> d_act_bf16_;  // per layer, null for the last
  uint16_t* d_delta_bf16_ = nullptr;

  // Pinned host staging buffers.
  float* h_params_ = nullptr;
  float* h_grads_ = nullptr;
  float* h_features_ = nullptr;
  int32_t* h_labels_ = nullptr;
  float* h_targets_ = nullptr;
  ck::LossTotals* h_totals_ = nullptr;

  // Step state.
  bool idle_ = true;  // false while a call is in progress or after it failed
  bool graphs_enabled_ = true;
  int64_t eager_rows_ = 0;  // rows of the last eager step
  cudaGraphExec_t graph_exec_ = nullptr;
  int64_t graph_rows_ = 0;
};

}  // namespace

absl::StatusOr<GemmPrecision> ParseGemmPrecision(std::string_view text) {
  if (text == "fp32") return GemmPrecision::kF32;
  if (text == "tf32") return GemmPrecision::kTf32;
  if (text == "bf16") return GemmPrecision::kBf16;
  return absl::InvalidArgumentError(
      absl::StrCat("--gemm_precision: expected fp32, tf32 or bf16, got '", std::string(text), "'"));
}

std::string_view GemmPrecisionName(GemmPrecision precision) {
  switch (precision) {
    case GemmPrecision::kF32:
      return "fp32";
    case GemmPrecision::kTf32:
      return "tf32";
    case GemmPrecision::kBf16:
      return "bf16";
  }
  return "unknown";
}

absl::Status CheckCudaDevice() {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    cudaGetLastError();
    return absl::FailedPreconditionError(absl::StrCat(
        "no CUDA device is visible (cudaGetDeviceCount: ", cudaGetErrorString(error), ")"));
  }
  if (count <= 0) {
    return absl::FailedPreconditionError(
        "no CUDA device is visible (cudaGetDeviceCount: 0 devices)");
  }
  return absl::OkStatus();
}

bool CudaDeviceAvailable() { return CheckCudaDevice().ok(); }

absl::StatusOr<std::unique_ptr<GradientBackend>> CreateCudaBackend(const ModelSpec& model,
                                                                   int64_t max_batch,
                                                                   GemmPrecision precision) {
  if (max_batch <= 0 || max_batch > INT_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_batch ", max_batch, " is outside [1, ", INT_MAX, "]"));
  }
  const size_t num_layers = model.layer_sizes.empty() ? 0 : model.layer_sizes.size() - 1;
  if (num_layers == 0 || model.params.size() != 2 * num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model '", model.kind, "' has ", model.layer_sizes.size(), " layer sizes and ",
        model.params.size(), " params; expected at least 2 sizes and 2 params per layer"));
  }
  const std::vector<int64_t> offsets = model.param_offsets();
  std::vector<Layer> layers;
  int64_t scratch_per_row = model.input_dim();
  for (size_t l = 0; l < num_layers; ++l) {
    Layer layer;
    layer.in = model.layer_sizes[l];
    layer.out = model.layer_sizes[l + 1];
    layer.weight_offset = offsets[2 * l];
    layer.bias_offset = offsets[2 * l + 1];
    const ParamSpec& w = model.params[2 * l];
    const ParamSpec& b = model.params[2 * l + 1];
    if (layer.in <= 0 || layer.out <= 0 || layer.in > kMaxLayerSize || layer.out > kMaxLayerSize ||
        w.shape != std::vector<int64_t>{layer.out, layer.in} ||
        b.shape != std::vector<int64_t>{layer.out}) {
      return absl::InvalidArgumentError(absl::StrCat("model params '", w.name, "' / '", b.name,
                                                     "' do not match layer sizes ", layer.in,
                                                     " -> ", layer.out));
    }
    scratch_per_row += 3 * layer.out;  // activations plus two delta buffers
    layers.push_back(layer);
  }
  if (max_batch > kMaxScratchFloats / scratch_per_row) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_batch ", max_batch, " needs more than ", kMaxScratchFloats,
                     " floats of scratch for model '", model.kind, "'"));
  }
  TESSERA_RETURN_IF_ERROR(CheckCudaDevice());
  int device = 0;
  TESSERA_RETURN_IF_ERROR(CudaStatus(cudaGetDevice(&device), "get device"));
  int major = 0;
  TESSERA_RETURN_IF_ERROR(
      CudaStatus(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
                 "query compute capability"));
  if (precision != GemmPrecision::kF32 && major < 8) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--gemm_precision=", std::string(GemmPrecisionName(precision)),
        " needs compute capability 8.0 or newer; device ", device, " is ", major, ".x"));
  }
  auto backend = std::make_unique<CudaBackend>(std::move(layers), model.loss, model.total_params(),
                                               max_batch, precision, device);
  TESSERA_RETURN_IF_ERROR(Annotate(backend->Init(), "CUDA backend"));
  return std::unique_ptr<GradientBackend>(std::move(backend));
}

}  // namespace tessera
