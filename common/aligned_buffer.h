// A fixed-size float array on a 64-byte boundary, for vectorised kernels.

#ifndef TESSERA_COMMON_ALIGNED_BUFFER_H_
#define TESSERA_COMMON_ALIGNED_BUFFER_H_

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>
#include <vector>

#include "absl/types/span.h"

namespace tessera {

// Owns `size` floats aligned to 64 bytes, filled with `fill`. Movable, not
// copyable. Not thread-safe.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t size, float fill = 0.0f) : size_(size) {
    if (size == 0) return;
    const size_t bytes = (size * sizeof(float) + 63) / 64 * 64;
    data_.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    if (!data_) throw std::bad_alloc();
    for (size_t i = 0; i < size; ++i) data_[i] = fill;
  }

  float* data() { return data_.get(); }
  const float* data() const { return data_.get(); }
  size_t size() const { return size_; }
  absl::Span<float> span() { return {data_.get(), size_}; }
  absl::Span<const float> span() const { return {data_.get(), size_}; }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float[], Free> data_;
  size_t size_ = 0;
};

// A std::allocator that returns 64-byte-aligned storage. Eigen's vectorised
// reductions peel unaligned leading elements off in scalar code, so the
// rounding of a sum depends on where the data starts; buffers that feed
// them are kept on one alignment so that results are bit-for-bit
// repeatable from run to run.
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}  // NOLINT: allocator rebind
  T* allocate(size_t n) {
    const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes == 0 ? 64 : bytes);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const AlignedAllocator<U>&) const { return false; }
};

template <typename T>
using AlignedVector = std::vector<T, AlignedAllocator<T>>;

}  // namespace tessera

#endif  // TESSERA_COMMON_ALIGNED_BUFFER_H_
