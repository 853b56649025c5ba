// In-memory training data: file readers, a synthetic set, deterministic epoch
// shuffling and batch assembly.

#ifndef TESSERA_WORKER_DATASET_H_
#define TESSERA_WORKER_DATASET_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/aligned_buffer.h"
#include "worker/gradient_backend.h"

namespace tessera {

// A dense table of examples. Classification sets fill `labels`; regression
// sets fill `targets`; the other stays empty.
struct Dataset {
  int64_t rows = 0;
  int64_t dim = 0;
  std::vector<float> features;  // rows x dim
  std::vector<int32_t> labels;  // classification: rows
  int64_t target_dim = 0;
  std::vector<float> targets;   // regression: rows x target_dim
  int32_t num_classes = 0;      // classification: max label + 1
};

// Reads an image file and a label file in IDX format (as MNIST and
// Fashion-MNIST ship them), gzipped or not. Images (magic 0x00000803, uint8,
// dims N x height x width, big-endian header) become height*width features
// scaled by 1/255; labels use magic 0x00000801. Errors name the offending
// file: kNotFound if it does not exist, kInvalidArgument for a bad magic or
// header or when the image and label counts differ, kDataLoss for truncated
// or corrupt data.
absl::StatusOr<Dataset> ReadIdx(const std::string& images_path,
                                const std::string& labels_path);

// Reads a numeric comma-separated file. The first line is skipped if
// `has_header`; blank lines are ignored. `label_column` is 0-based, negative
// values count from the end (-1 = last column); all other columns are
// features. With `classification` the label must be a non-negative integer
// and goes to `labels`; otherwise it becomes a 1-wide target. Errors
// (kNotFound for a missing file, kInvalidArgument otherwise) name file:line
// and, for a bad value, the column.
absl::StatusOr<Dataset> ReadCsv(const std::string& path, int label_column,
                                bool has_header, bool classification);

// Reads libsvm/svmlight text: "label idx:val idx:val ..." with 1-based,
// strictly increasing indices; omitted features are 0. `num_features` fixes
// the dense width (0 infers it from the largest index). Classification
// labels must be non-negative integers; negative labels are rejected rather
// than remapped. Text after '#' is a comment. Errors name file:line.
absl::StatusOr<Dataset> ReadLibsvm(const std::string& path,
                                   int64_t num_features, bool classification);

// A synthetic regression set: x ~ N(0, 1) and
// y = sum_j w_j x_j / sqrt(features) + 0.5 sin(x_0 x_1) + N(0, 0.1^2), with
// w ~ N(0, 1), all drawn from one std::mt19937_64 seeded with `seed`, so the
// set is identical on every platform for a given seed. A 10-100-1 ReLU MLP
// can fit it well. Returns an empty set if rows or features is not positive.
Dataset MakeSyntheticRegression(int64_t rows, int64_t features, uint64_t seed);

// Moves the last `holdout` rows (clamped to [0, rows]) into a second dataset,
// e.g. for a validation split. Both halves keep the full set's num_classes.
std::pair<Dataset, Dataset> SplitTail(Dataset all, int64_t holdout);

// A permutation of [0, n) for one epoch, identical on every process and
// platform for the same (seed, epoch). Empty if n <= 0.
std::vector<int64_t> EpochPermutation(int64_t n, uint64_t seed, int64_t epoch);

// Reusable host storage for mini-batches. Not thread-safe.
class BatchBuffer {
 public:
  // Copies `rows` of `data` (each in [0, data.rows)) into this buffer and
  // returns a Batch pointing into it, valid until the next Gather or the
  // buffer's destruction. Storage is reused, so gathering batches no larger
  // than before does not allocate. labels/targets are null if `data` has
  // none.
  Batch Gather(const Dataset& data, absl::Span<const int64_t> rows);

  // A Batch over rows [begin, begin + count) of `data` without copying, for
  // evaluation; valid while `data` is alive and unmodified. Requires
  // 0 <= begin and begin + count <= data.rows.
  static Batch View(const Dataset& data, int64_t begin, int64_t count);

 private:
  // Aligned so that the gradient math rounds the same way in every run.
  AlignedVector<float> features_;
  std::vector<int32_t> labels_;
  AlignedVector<float> targets_;
};

}  // namespace tessera

#endif  // TESSERA_WORKER_DATASET_H_
