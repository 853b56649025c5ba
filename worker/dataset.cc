#include "worker/dataset.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace tessera {
namespace {

constexpr uint32_t kIdxImagesMagic = 0x00000803;
constexpr uint32_t kIdxLabelsMagic = 0x00000801;
// Bounds on per-row width so a corrupt header or a stray huge index cannot
// trigger an enormous allocation.
constexpr uint64_t kMaxImagePixels = uint64_t{1} << 24;
constexpr int64_t kMaxLibsvmIndex = int64_t{1} << 24;
constexpr size_t kReadChunk = size_t{1} << 20;
constexpr double kTwoPi = 6.283185307179586476925286766559;

uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Sequential reader over a file through zlib, which passes plain files
// through unchanged, so every format here also accepts a .gz version.
class GzReader {
 public:
  static absl::StatusOr<std::unique_ptr<GzReader>> Open(
      const std::string& path) {
    errno = 0;
    gzFile file = gzopen(path.c_str(), "rb");
    if (file == nullptr) {
      const int err = errno;
      const std::string message =
          absl::StrCat("cannot open '", path, "': ",
                       err != 0 ? std::strerror(err) : "out of memory");
      if (err == ENOENT) return absl::NotFoundError(message);
      if (err == EACCES) return absl::PermissionDeniedError(message);
      return absl::UnavailableError(message);
    }
    gzbuffer(file, 1 << 17);
    return std::unique_ptr<GzReader>(new GzReader(path, file));
  }

  ~GzReader() { gzclose(file_); }
  GzReader(const GzReader&) = delete;
  GzReader& operator=(const GzReader&) = delete;

  // Reads up to n bytes; fewer only at end of file.
  absl::StatusOr<size_t> Read(void* buf, size_t n) {
    size_t done = 0;
    while (done < n) {
      const unsigned want =
          static_cast<unsigned>(std::min(n - done, kReadChunk));
      const int got = gzread(file_, static_cast<char*>(buf) + done, want);
      if (got < 0) {
        int errnum = 0;
        const char* msg = gzerror(file_, &errnum);
        return absl::DataLossError(
            absl::StrCat("'", path_, "': read failed: ", msg));
      }
      if (got == 0) break;
      done += static_cast<size_t>(got);
    }
    return done;
  }

  // Stores the next line, without "\n" or "\r\n", in *line. Returns false
  // at end of file.
  absl::StatusOr<bool> NextLine(std::string* line) {
    while (true) {
      const size_t newline = buffer_.find('\n', pos_);
      if (newline != std::string::npos || eof_) {
        if (newline == std::string::npos && pos_ == buffer_.size()) {
          return false;
        }
        const size_t end = newline == std::string::npos ? buffer_.size()
                                                        : newline;
        line->assign(buffer_, pos_, end - pos_);
        pos_ = newline == std::string::npos ? end : end + 1;
        if (!line->empty() && line->back() == '\r') line->pop_back();
        return true;
      }
      buffer_.erase(0, pos_);
      pos_ = 0;
      const size_t old_size = buffer_.size();
      buffer_.resize(old_size + (1 << 16));
      absl::StatusOr<size_t> got = Read(buffer_.data() + old_size, 1 << 16);
      if (!got.ok()) return got.status();
      buffer_.resize(old_size + *got);
      eof_ = *got == 0;
    }
  }

 private:
  GzReader(std::string path, gzFile file)
      : path_(std::move(path)), file_(file) {}

  const std::string path_;
  gzFile file_;
  std::string buffer_;
  size_t pos_ = 0;
  bool eof_ = false;
};

// Reads a big-endian uint32 from an IDX header.
absl::StatusOr<uint64_t> ReadIdxWord(GzReader& in, const std::string& path) {
  unsigned char b[4];
  absl::StatusOr<size_t> got = in.Read(b, sizeof(b));
  if (!got.ok()) return got.status();
  if (*got != sizeof(b)) {
    return absl::DataLossError(
        absl::StrCat("'", path, "': truncated IDX header"));
  }
  return uint64_t{b[0]} << 24 | uint64_t{b[1]} << 16 | uint64_t{b[2]} << 8 |
         uint64_t{b[3]};
}

// Checks the IDX magic, then reads `num_dims` dimension sizes. The magic is
// checked first so a wrong kind of file is reported as such even when it is
// shorter than the expected header.
absl::StatusOr<std::vector<uint64_t>> ReadIdxHeader(GzReader& in,
                                                    const std::string& path,
                                                    uint32_t magic,
                                                    int num_dims) {
  absl::StatusOr<uint64_t> found = ReadIdxWord(in, path);
  if (!found.ok()) return found.status();
  if (*found != magic) {
    return absl::InvalidArgumentError(absl::StrCat(
        "'", path, "': bad IDX magic 0x", absl::Hex(*found, absl::kZeroPad8),
        ", expected 0x", absl::Hex(magic, absl::kZeroPad8)));
  }
  std::vector<uint64_t> dims;
  for (int d = 0; d < num_dims; ++d) {
    absl::StatusOr<uint64_t> dim = ReadIdxWord(in, path);
    if (!dim.ok()) return dim.status();
    dims.push_back(*dim);
  }
  return dims;
}

// Reads `count` bytes that follow an IDX header, appending each one, scaled,
// to *out. Reads in chunks so a lying header cannot force a huge allocation
// before the data proves to be there.
absl::Status ReadIdxBytes(GzReader& in, const std::string& path,
                          uint64_t count, float scale,
                          std::vector<float>* out) {
  std::vector<unsigned char> chunk(kReadChunk);
  uint64_t done = 0;
  while (done < count) {
    const size_t want = static_cast<size_t>(
        std::min<uint64_t>(count - done, chunk.size()));
    absl::StatusOr<size_t> got = in.Read(chunk.data(), want);
    if (!got.ok()) return got.status();
    const size_t old_size = out->size();
    out->resize(old_size + *got);
    float* dst = out->data() + old_size;
    for (size_t i = 0; i < *got; ++i) dst[i] = chunk[i] * scale;
    done += *got;
    if (*got < want) {
      return absl::DataLossError(absl::StrCat("'", path, "': truncated: ",
                                              "header promises ", count,
                                              " data bytes, found ", done));
    }
  }
  return absl::OkStatus();
}

absl::Status LineError(const std::string& path, int64_t line,
                       absl::string_view problem) {
  return absl::InvalidArgumentError(
      absl::StrCat(path, ":", line, ": ", problem));
}

bool ParseFinite(absl::string_view text, float* value) {
  return absl::SimpleAtof(text, value) && std::isfinite(*value);
}

bool ParseClassLabel(absl::string_view text, int32_t* label) {
  double value = 0;
  if (!absl::SimpleAtod(text, &value) || !(value >= 0) ||
      value >= double(std::numeric_limits<int32_t>::max()) ||
      value != std::floor(value)) {
    return false;
  }
  *label = static_cast<int32_t>(value);
  return true;
}

// Sets num_classes from the labels; no-op for regression sets.
void SetNumClasses(Dataset& data) {
  for (int32_t label : data.labels) {
    data.num_classes = std::max(data.num_classes, label + 1);
  }
}

// Draws standard normals with the Box-Muller transform, defined here so the
// stream is the same on every standard library (std::normal_distribution
// is implementation-defined).
class NormalSource {
 public:
  explicit NormalSource(uint64_t seed) : rng_(seed) {}

  double Next() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    // u1 in (0, 1] so log(u1) is finite; u2 in [0, 1).
    const double u1 = double((rng_() >> 11) + 1) * 0x1.0p-53;
    const double u2 = double(rng_() >> 11) * 0x1.0p-53;
    const double radius = std::sqrt(-2.0 * std::log(u1));
    const double angle = kTwoPi * u2;
    spare_ = radius * std::sin(angle);
    has_spare_ = true;
    return radius * std::cos(angle);
  }

 private:
  std::mt19937_64 rng_;
  double spare_ = 0;
  bool has_spare_ = false;
};

// Uniform in [0, bound) without modulo bias, via rejection of the short
// final stretch of the 64-bit range.
uint64_t UniformBelow(std::mt19937_64& rng, uint64_t bound) {
  const uint64_t threshold = (0 - bound) % bound;
  while (true) {
    const uint64_t r = rng();
    if (r >= threshold) return r % bound;
  }
}

}  // namespace

absl::StatusOr<Dataset> ReadIdx(const std::string& images_path,
                                const std::string& labels_path) {
  Dataset data;
  {
    absl::StatusOr<std::unique_ptr<GzReader>> in = GzReader::Open(images_path);
    if (!in.ok()) return in.status();
    absl::StatusOr<std::vector<uint64_t>> dims =
        ReadIdxHeader(**in, images_path, kIdxImagesMagic, 3);
    if (!dims.ok()) return dims.status();
    const uint64_t pixels = (*dims)[1] * (*dims)[2];
    if (pixels == 0 || pixels > kMaxImagePixels) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", images_path, "': image size ", (*dims)[1], " x ",
                       (*dims)[2], " must be between 1 and ", kMaxImagePixels,
                       " pixels"));
    }
    data.rows = static_cast<int64_t>((*dims)[0]);
    data.dim = static_cast<int64_t>(pixels);
    if (absl::Status s = ReadIdxBytes(**in, images_path, (*dims)[0] * pixels,
                                      1.0f / 255.0f, &data.features);
        !s.ok()) {
      return s;
    }
  }
  absl::StatusOr<std::unique_ptr<GzReader>> in = GzReader::Open(labels_path);
  if (!in.ok()) return in.status();
  absl::StatusOr<std::vector<uint64_t>> dims =
      ReadIdxHeader(**in, labels_path, kIdxLabelsMagic, 1);
  if (!dims.ok()) return dims.status();
  if ((*dims)[0] != static_cast<uint64_t>(data.rows)) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", labels_path, "' has ", (*dims)[0], " labels but '",
                     images_path, "' has ", data.rows, " images"));
  }
  std::vector<float> labels;
  if (absl::Status s = ReadIdxBytes(**in, labels_path, (*dims)[0], 1.0f,
                                    &labels);
      !s.ok()) {
    return s;
  }
  data.labels.assign(labels.begin(), labels.end());
  SetNumClasses(data);
  return data;
}

absl::StatusOr<Dataset> ReadCsv(const std::string& path, int label_column,
                                bool has_header, bool classification) {
  absl::StatusOr<std::unique_ptr<GzReader>> in = GzReader::Open(path);
  if (!in.ok()) return in.status();
  Dataset data;
  int64_t num_columns = 0;
  int64_t label_index = 0;
  std::string line;
  std::vector<absl::string_view> fields;
  for (int64_t line_number = 1;; ++line_number) {
    absl::StatusOr<bool> more = (*in)->NextLine(&line);
    if (!more.ok()) return more.status();
    if (!*more) break;
    if (has_header && line_number == 1) continue;
    if (absl::StripAsciiWhitespace(line).empty()) continue;
    fields = absl::StrSplit(line, ',');
    if (num_columns == 0) {
      num_columns = static_cast<int64_t>(fields.size());
      if (num_columns < 2) {
        return LineError(path, line_number,
                         "need at least 2 columns (features and a label)");
      }
      label_index = label_column < 0 ? num_columns + label_column
                                     : int64_t{label_column};
      if (label_index < 0 || label_index >= num_columns) {
        return LineError(path, line_number,
                         absl::StrCat("label column ", label_column,
                                      " out of range for ", num_columns,
                                      " columns"));
      }
      data.dim = num_columns - 1;
    } else if (static_cast<int64_t>(fields.size()) != num_columns) {
      return LineError(path, line_number,
                       absl::StrCat("expected ", num_columns,
                                    " columns, found ", fields.size()));
    }
    for (int64_t c = 0; c < num_columns; ++c) {
      const absl::string_view field = absl::StripAsciiWhitespace(fields[c]);
      if (c == label_index && classification) {
        int32_t label = 0;
        if (!ParseClassLabel(field, &label)) {
          return LineError(path, line_number,
                           absl::StrCat("column ", c + 1, ": label '", field,
                                        "' is not a non-negative integer"));
        }
        data.labels.push_back(label);
        continue;
      }
      float value = 0;
      if (!ParseFinite(field, &value)) {
        return LineError(path, line_number,
                         absl::StrCat("column ", c + 1, ": '", field,
                                      "' is not a finite number"));
      }
      (c == label_index ? data.targets : data.features).push_back(value);
    }
    ++data.rows;
  }
  if (data.rows == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", path, "': no data rows"));
  }
  if (!classification) data.target_dim = 1;
  SetNumClasses(data);
  return data;
}

absl::StatusOr<Dataset> ReadLibsvm(const std::string& path,
                                   int64_t num_features, bool classification) {
  if (num_features < 0 || num_features > kMaxLibsvmIndex) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", path, "': num_features ", num_features,
                     " outside [0, ", kMaxLibsvmIndex, "]"));
  }
  absl::StatusOr<std::unique_ptr<GzReader>> in = GzReader::Open(path);
  if (!in.ok()) return in.status();
  Dataset data;
  // Kept sparse until the width is known.
  std::vector<std::pair<int64_t, float>> entries;
  std::vector<size_t> row_ends;
  int64_t max_index = 0;
  std::string line;
  for (int64_t line_number = 1;; ++line_number) {
    absl::StatusOr<bool> more = (*in)->NextLine(&line);
    if (!more.ok()) return more.status();
    if (!*more) break;
    const absl::string_view content =
        absl::string_view(line).substr(0, line.find('#'));
    std::vector<absl::string_view> tokens =
        absl::StrSplit(content, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (tokens.empty()) continue;
    if (classification) {
      int32_t label = 0;
      if (!ParseClassLabel(tokens[0], &label)) {
        return LineError(path, line_number,
                         absl::StrCat("label '", tokens[0],
                                      "' is not a non-negative integer"));
      }
      data.labels.push_back(label);
    } else {
      float target = 0;
      if (!ParseFinite(tokens[0], &target)) {
        return LineError(path, line_number,
                         absl::StrCat("target '", tokens[0],
                                      "' is not a finite number"));
      }
      data.targets.push_back(target);
    }
    int64_t previous = 0;
    for (size_t t = 1; t < tokens.size(); ++t) {
      const size_t colon = tokens[t].find(':');
      int64_t index = 0;
      float value = 0;
      if (colon == absl::string_view::npos ||
          !absl::SimpleAtoi(tokens[t].substr(0, colon), &index) ||
          !ParseFinite(tokens[t].substr(colon + 1), &value)) {
        return LineError(path, line_number,
                         absl::StrCat("'", tokens[t],
                                      "' is not index:value with a finite "
                                      "value"));
      }
      const int64_t limit = num_features > 0 ? num_features : kMaxLibsvmIndex;
      if (index <= previous || index > limit) {
        return LineError(
            path, line_number,
            absl::StrCat("index ", index, " must be in [", previous + 1, ", ",
                         limit, "] (1-based, strictly increasing)"));
      }
      previous = index;
      entries.emplace_back(index - 1, value);
    }
    max_index = std::max(max_index, previous);
    row_ends.push_back(entries.size());
  }
  data.rows = static_cast<int64_t>(row_ends.size());
  data.dim = num_features > 0 ? num_features : max_index;
  if (data.rows == 0 || data.dim == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "'", path, "': no ", data.rows == 0 ? "data rows" : "feature indices"));
  }
  data.features.assign(data.rows * data.dim, 0.0f);
  size_t e = 0;
  for (int64_t r = 0; r < data.rows; ++r) {
    for (; e < row_ends[r]; ++e) {
      data.features[r * data.dim + entries[e].first] = entries[e].second;
    }
  }
  if (!classification) data.target_dim = 1;
  SetNumClasses(data);
  return data;
}

Dataset MakeSyntheticRegression(int64_t rows, int64_t features,
                                uint64_t seed) {
  Dataset data;
  if (rows <= 0 || features <= 0) return data;
  data.rows = rows;
  data.dim = features;
  data.target_dim = 1;
  data.features.resize(rows * features);
  data.targets.resize(rows);
  NormalSource normal(seed);
  std::vector<double> w(features);
  // Dividing by sqrt(features) keeps the linear part near unit variance, so
  // the sin term and the noise stay meaningful at any width.
  const double w_scale = 1.0 / std::sqrt(double(features));
  for (double& wj : w) wj = normal.Next() * w_scale;
  for (int64_t r = 0; r < rows; ++r) {
    float* x = data.features.data() + r * features;
    double y = 0;
    for (int64_t j = 0; j < features; ++j) {
      x[j] = static_cast<float>(normal.Next());
      y += w[j] * x[j];
    }
    y += 0.5 * std::sin(double(x[0]) * x[features > 1 ? 1 : 0]);
    y += 0.1 * normal.Next();
    data.targets[r] = static_cast<float>(y);
  }
  return data;
}

std::pair<Dataset, Dataset> SplitTail(Dataset all, int64_t holdout) {
  holdout = std::clamp<int64_t>(holdout, 0, all.rows);
  const int64_t keep = all.rows - holdout;
  Dataset tail;
  tail.rows = holdout;
  tail.dim = all.dim;
  tail.target_dim = all.target_dim;
  tail.num_classes = all.num_classes;
  tail.features.assign(all.features.begin() + keep * all.dim,
                       all.features.end());
  all.features.resize(keep * all.dim);
  if (!all.labels.empty()) {
    tail.labels.assign(all.labels.begin() + keep, all.labels.end());
    all.labels.resize(keep);
  }
  if (!all.targets.empty()) {
    tail.targets.assign(all.targets.begin() + keep * all.target_dim,
                        all.targets.end());
    all.targets.resize(keep * all.target_dim);
  }
  all.rows = keep;
  return {std::move(all), std::move(tail)};
}

std::vector<int64_t> EpochPermutation(int64_t n, uint64_t seed,
                                      int64_t epoch) {
  if (n <= 0) return {};
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  // Scaling the epoch keeps pairs such as (seed 1, epoch 0) and (seed 0,
  // epoch 1) from producing the same stream.
  const uint64_t epoch_bits =
      static_cast<uint64_t>(epoch) * 0xD1B54A32D192ED03ull;
  std::mt19937_64 rng(SplitMix64(seed ^ epoch_bits));
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j =
        static_cast<int64_t>(UniformBelow(rng, static_cast<uint64_t>(i) + 1));
    std::swap(order[i], order[j]);
  }
  return order;
}

Batch BatchBuffer::Gather(const Dataset& data,
                          absl::Span<const int64_t> rows) {
  const int64_t n = static_cast<int64_t>(rows.size());
  features_.resize(n * data.dim);
  labels_.resize(data.labels.empty() ? 0 : n);
  targets_.resize(data.targets.empty() ? 0 : n * data.target_dim);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = rows[i];
    std::copy_n(data.features.data() + r * data.dim, data.dim,
                features_.data() + i * data.dim);
    if (!labels_.empty()) labels_[i] = data.labels[r];
    if (!targets_.empty()) {
      std::copy_n(data.targets.data() + r * data.target_dim, data.target_dim,
                  targets_.data() + i * data.target_dim);
    }
  }
  Batch batch;
  batch.features = features_.data();
  batch.rows = n;
  batch.labels = data.labels.empty() ? nullptr : labels_.data();
  batch.targets = data.targets.empty() ? nullptr : targets_.data();
  return batch;
}

Batch BatchBuffer::View(const Dataset& data, int64_t begin, int64_t count) {
  Batch batch;
  batch.features = data.features.data() + begin * data.dim;
  batch.rows = count;
  if (!data.labels.empty()) batch.labels = data.labels.data() + begin;
  if (!data.targets.empty()) {
    batch.targets = data.targets.data() + begin * data.target_dim;
  }
  return batch;
}

}  // namespace tessera
