#include "worker/dataset.h"

#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

std::string TempPath(const std::string& name) {
  std::string dir = testing::TempDir();
  if (!dir.empty() && dir.back() != '/') dir += '/';
  return absl::StrCat(dir, "dataset_test_", name);
}

void WriteFile(const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << contents;
  ASSERT_TRUE(out.good()) << path;
}

void WriteGzFile(const std::string& path, const std::string& contents) {
  gzFile file = gzopen(path.c_str(), "wb");
  ASSERT_NE(file, nullptr) << path;
  ASSERT_EQ(gzwrite(file, contents.data(), contents.size()),
            static_cast<int>(contents.size()));
  ASSERT_EQ(gzclose(file), Z_OK);
}

std::string BigEndian(uint32_t v) {
  return {static_cast<char>(v >> 24), static_cast<char>(v >> 16),
          static_cast<char>(v >> 8), static_cast<char>(v)};
}

std::string IdxImages(uint32_t n, uint32_t h, uint32_t w,
                      const std::vector<uint8_t>& pixels) {
  return BigEndian(0x803) + BigEndian(n) + BigEndian(h) + BigEndian(w) +
         std::string(pixels.begin(), pixels.end());
}

std::string IdxLabels(const std::vector<uint8_t>& labels) {
  return BigEndian(0x801) + BigEndian(static_cast<uint32_t>(labels.size())) +
         std::string(labels.begin(), labels.end());
}

// Three 2x2 images with labels {4, 0, 2}.
const std::vector<uint8_t> kPixels = {0,  255, 51, 102, 1,  2,
                                      3,  4,   10, 20,  30, 255};
const std::vector<uint8_t> kLabels = {4, 0, 2};

void ExpectSmallIdx(const absl::StatusOr<Dataset>& data) {
  ASSERT_TRUE(data.ok()) << data.status();
  EXPECT_EQ(data->rows, 3);
  EXPECT_EQ(data->dim, 4);
  EXPECT_EQ(data->num_classes, 5);
  EXPECT_EQ(data->labels, (std::vector<int32_t>{4, 0, 2}));
  ASSERT_EQ(data->features.size(), kPixels.size());
  for (size_t i = 0; i < kPixels.size(); ++i) {
    EXPECT_FLOAT_EQ(data->features[i], kPixels[i] / 255.0f) << i;
  }
  EXPECT_TRUE(data->targets.empty());
}

TEST(ReadIdxTest, ReadsPlainAndGzipped) {
  const std::string images = TempPath("plain-images-idx3-ubyte");
  const std::string labels = TempPath("plain-labels-idx1-ubyte");
  WriteFile(images, IdxImages(3, 2, 2, kPixels));
  WriteFile(labels, IdxLabels(kLabels));
  ExpectSmallIdx(ReadIdx(images, labels));

  const std::string gz_images = TempPath("images-idx3-ubyte.gz");
  const std::string gz_labels = TempPath("labels-idx1-ubyte.gz");
  WriteGzFile(gz_images, IdxImages(3, 2, 2, kPixels));
  WriteGzFile(gz_labels, IdxLabels(kLabels));
  ExpectSmallIdx(ReadIdx(gz_images, gz_labels));
}

void ExpectError(const absl::StatusOr<Dataset>& data, absl::StatusCode code,
                 const std::string& path, const std::string& detail) {
  ASSERT_FALSE(data.ok());
  EXPECT_EQ(data.status().code(), code) << data.status();
  EXPECT_TRUE(absl::StrContains(data.status().message(), path))
      << data.status();
  EXPECT_TRUE(absl::StrContains(data.status().message(), detail))
      << data.status();
}

TEST(ReadIdxTest, ReportsErrorsNamingTheFile) {
  const std::string images = TempPath("err-images");
  const std::string labels = TempPath("err-labels");
  WriteFile(labels, IdxLabels(kLabels));

  ExpectError(ReadIdx(TempPath("missing-images"), labels),
              absl::StatusCode::kNotFound, TempPath("missing-images"),
              "cannot open");

  WriteFile(images, IdxImages(3, 2, 2, kPixels));
  ExpectError(ReadIdx(images, TempPath("missing-labels")),
              absl::StatusCode::kNotFound, TempPath("missing-labels"),
              "cannot open");

  // Labels passed where images are expected.
  ExpectError(ReadIdx(labels, labels), absl::StatusCode::kInvalidArgument,
              labels, "bad IDX magic 0x00000801, expected 0x00000803");

  std::vector<uint8_t> short_pixels(kPixels.begin(), kPixels.end() - 1);
  WriteFile(images, IdxImages(3, 2, 2, short_pixels));
  ExpectError(ReadIdx(images, labels), absl::StatusCode::kDataLoss, images,
              "truncated");

  WriteFile(images, BigEndian(0x803) + BigEndian(3));
  ExpectError(ReadIdx(images, labels), absl::StatusCode::kDataLoss, images,
              "truncated IDX header");

  WriteFile(images, IdxImages(3, 2, 2, kPixels));
  WriteFile(labels, IdxLabels({1, 2}));
  ExpectError(ReadIdx(images, labels), absl::StatusCode::kInvalidArgument,
              labels, "2 labels but");

  WriteFile(labels, IdxLabels(kLabels).substr(0, 10));
  ExpectError(ReadIdx(images, labels), absl::StatusCode::kDataLoss, labels,
              "truncated");

  WriteFile(images, IdxImages(1, 0, 5, {}));
  ExpectError(ReadIdx(images, labels), absl::StatusCode::kInvalidArgument,
              images, "image size 0 x 5");
}

TEST(ReadIdxTest, ReadsFashionMnistIfInstalled) {
  const std::string dir = "/usr/share/datasets/fashion-mnist/";
  if (!std::filesystem::exists(dir + "train-labels-idx1-ubyte.gz")) {
    GTEST_SKIP() << "Fashion-MNIST not installed under " << dir;
  }
  absl::StatusOr<Dataset> train =
      ReadIdx(dir + "train-images-idx3-ubyte.gz",
              dir + "train-labels-idx1-ubyte.gz");
  ASSERT_TRUE(train.ok()) << train.status();
  EXPECT_EQ(train->rows, 60000);
  EXPECT_EQ(train->dim, 784);
  EXPECT_EQ(train->num_classes, 10);
  EXPECT_EQ(train->features.size(), 60000u * 784);
  const auto [lo, hi] =
      std::minmax_element(train->features.begin(), train->features.end());
  EXPECT_EQ(*lo, 0.0f);
  EXPECT_EQ(*hi, 1.0f);
  absl::StatusOr<Dataset> test = ReadIdx(dir + "t10k-images-idx3-ubyte.gz",
                                         dir + "t10k-labels-idx1-ubyte.gz");
  ASSERT_TRUE(test.ok()) << test.status();
  EXPECT_EQ(test->rows, 10000);
  EXPECT_EQ(test->dim, 784);
  EXPECT_EQ(test->num_classes, 10);
}

TEST(ReadCsvTest, ReadsHeaderAndLabelColumns) {
  const std::string path = TempPath("data.csv");
  WriteFile(path, "a,b,label\r\n1.5, -2,3\n\n0,1e2,0\n");
  absl::StatusOr<Dataset> last = ReadCsv(path, -1, true, true);
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_EQ(last->rows, 2);
  EXPECT_EQ(last->dim, 2);
  EXPECT_EQ(last->features, (std::vector<float>{1.5f, -2, 0, 100}));
  EXPECT_EQ(last->labels, (std::vector<int32_t>{3, 0}));
  EXPECT_EQ(last->num_classes, 4);
  EXPECT_TRUE(last->targets.empty());

  absl::StatusOr<Dataset> first = ReadCsv(path, 0, true, false);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->features, (std::vector<float>{-2, 3, 100, 0}));
  EXPECT_EQ(first->targets, (std::vector<float>{1.5f, 0}));
  EXPECT_EQ(first->target_dim, 1);
  EXPECT_TRUE(first->labels.empty());

  // Negative index from the end, without a header.
  const std::string bare = TempPath("bare.csv");
  WriteFile(bare, "1,7,2\n4,8,5");
  absl::StatusOr<Dataset> middle = ReadCsv(bare, -2, false, true);
  ASSERT_TRUE(middle.ok()) << middle.status();
  EXPECT_EQ(middle->labels, (std::vector<int32_t>{7, 8}));
  EXPECT_EQ(middle->features, (std::vector<float>{1, 2, 4, 5}));
}

TEST(ReadCsvTest, ReportsFileLineAndColumn) {
  const std::string path = TempPath("bad.csv");
  WriteFile(path, "x,y\n1,2\n3,oops\n");
  ExpectError(ReadCsv(path, -1, true, false),
              absl::StatusCode::kInvalidArgument, path + ":3",
              "column 2: 'oops' is not a finite number");

  WriteFile(path, "1,2\n3,-1\n");
  ExpectError(ReadCsv(path, -1, false, true),
              absl::StatusCode::kInvalidArgument, path + ":2",
              "label '-1' is not a non-negative integer");
  WriteFile(path, "1,2.5\n");
  ExpectError(ReadCsv(path, 1, false, true),
              absl::StatusCode::kInvalidArgument, path + ":1",
              "label '2.5'");

  WriteFile(path, "1,2,3\n4,5\n");
  ExpectError(ReadCsv(path, 0, false, true),
              absl::StatusCode::kInvalidArgument, path + ":2",
              "expected 3 columns, found 2");
  WriteFile(path, "1,nan\n");
  ExpectError(ReadCsv(path, 0, false, true),
              absl::StatusCode::kInvalidArgument, path + ":1", "'nan'");
  WriteFile(path, "1,2\n");
  ExpectError(ReadCsv(path, 2, false, true),
              absl::StatusCode::kInvalidArgument, path + ":1",
              "label column 2 out of range");
  ExpectError(ReadCsv(path, -3, false, true),
              absl::StatusCode::kInvalidArgument, path + ":1",
              "label column -3 out of range");
  WriteFile(path, "header\n");
  ExpectError(ReadCsv(path, 0, true, true),
              absl::StatusCode::kInvalidArgument, path, "no data rows");
  ExpectError(ReadCsv(TempPath("nope.csv"), 0, false, true),
              absl::StatusCode::kNotFound, TempPath("nope.csv"),
              "cannot open");
}

TEST(ReadLibsvmTest, Densifies) {
  const std::string path = TempPath("data.svm");
  WriteFile(path, "1 1:0.5 3:2\n0 2:-1 # comment\n\n2\t4:3\n");
  absl::StatusOr<Dataset> inferred = ReadLibsvm(path, 0, true);
  ASSERT_TRUE(inferred.ok()) << inferred.status();
  EXPECT_EQ(inferred->rows, 3);
  EXPECT_EQ(inferred->dim, 4);
  EXPECT_EQ(inferred->features,
            (std::vector<float>{0.5f, 0, 2, 0, 0, -1, 0, 0, 0, 0, 0, 3}));
  EXPECT_EQ(inferred->labels, (std::vector<int32_t>{1, 0, 2}));
  EXPECT_EQ(inferred->num_classes, 3);

  absl::StatusOr<Dataset> wide = ReadLibsvm(path, 6, false);
  ASSERT_TRUE(wide.ok()) << wide.status();
  EXPECT_EQ(wide->dim, 6);
  EXPECT_EQ(wide->features[6 * 2 + 3], 3.0f);
  EXPECT_EQ(wide->targets, (std::vector<float>{1, 0, 2}));
  EXPECT_EQ(wide->target_dim, 1);
}

TEST(ReadLibsvmTest, ReportsFileLine) {
  const std::string path = TempPath("bad.svm");
  WriteFile(path, "1 1:2\n-1 2:1\n");
  ExpectError(ReadLibsvm(path, 0, true), absl::StatusCode::kInvalidArgument,
              path + ":2", "label '-1' is not a non-negative integer");
  // Regression accepts the same negative value as a target.
  EXPECT_TRUE(ReadLibsvm(path, 0, false).ok());

  WriteFile(path, "1 1:2\n1 3:1 2:1\n");
  ExpectError(ReadLibsvm(path, 0, true), absl::StatusCode::kInvalidArgument,
              path + ":2", "index 2 must be in [4");
  WriteFile(path, "1 0:2\n");
  ExpectError(ReadLibsvm(path, 0, true), absl::StatusCode::kInvalidArgument,
              path + ":1", "index 0");
  WriteFile(path, "1 5:2\n");
  ExpectError(ReadLibsvm(path, 4, true), absl::StatusCode::kInvalidArgument,
              path + ":1", "index 5 must be in [1, 4]");
  WriteFile(path, "1 2:x\n");
  ExpectError(ReadLibsvm(path, 0, true), absl::StatusCode::kInvalidArgument,
              path + ":1", "'2:x'");
  WriteFile(path, "1 7\n");
  ExpectError(ReadLibsvm(path, 0, true), absl::StatusCode::kInvalidArgument,
              path + ":1", "'7'");
}

TEST(SyntheticRegressionTest, DeterministicPerSeed) {
  const Dataset a = MakeSyntheticRegression(500, 10, 7);
  const Dataset b = MakeSyntheticRegression(500, 10, 7);
  const Dataset c = MakeSyntheticRegression(500, 10, 8);
  EXPECT_EQ(a.rows, 500);
  EXPECT_EQ(a.dim, 10);
  EXPECT_EQ(a.target_dim, 1);
  EXPECT_EQ(a.features.size(), 5000u);
  EXPECT_EQ(a.targets.size(), 500u);
  EXPECT_TRUE(a.labels.empty());
  EXPECT_EQ(a.features, b.features);
  EXPECT_EQ(a.targets, b.targets);
  EXPECT_NE(a.features, c.features);
  EXPECT_NE(a.targets, c.targets);

  // Features look standard normal; targets are not constant.
  double sum = 0, sum_sq = 0;
  for (float x : a.features) {
    sum += x;
    sum_sq += double(x) * x;
  }
  EXPECT_NEAR(sum / 5000, 0.0, 0.05);
  EXPECT_NEAR(sum_sq / 5000, 1.0, 0.08);
  const auto [lo, hi] = std::minmax_element(a.targets.begin(), a.targets.end());
  EXPECT_GT(*hi - *lo, 2.0f);

  EXPECT_EQ(MakeSyntheticRegression(0, 10, 1).rows, 0);
  EXPECT_TRUE(MakeSyntheticRegression(5, 0, 1).features.empty());
}

TEST(SplitTailTest, MovesLastRows) {
  Dataset all;
  all.rows = 4;
  all.dim = 2;
  all.features = {0, 1, 2, 3, 4, 5, 6, 7};
  all.labels = {0, 1, 2, 1};
  all.num_classes = 3;
  auto [head, tail] = SplitTail(all, 1);
  EXPECT_EQ(head.rows, 3);
  EXPECT_EQ(head.features, (std::vector<float>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(head.labels, (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(tail.rows, 1);
  EXPECT_EQ(tail.features, (std::vector<float>{6, 7}));
  EXPECT_EQ(tail.labels, (std::vector<int32_t>{1}));
  EXPECT_EQ(tail.num_classes, 3);
  EXPECT_EQ(tail.dim, 2);

  const Dataset regression = MakeSyntheticRegression(10, 3, 1);
  auto [train, valid] = SplitTail(regression, 4);
  EXPECT_EQ(train.rows, 6);
  EXPECT_EQ(valid.rows, 4);
  EXPECT_EQ(valid.target_dim, 1);
  EXPECT_EQ(valid.targets,
            std::vector<float>(regression.targets.begin() + 6,
                               regression.targets.end()));
  EXPECT_EQ(train.features.size(), 18u);

  auto [everything, nothing] = SplitTail(all, 0);
  EXPECT_EQ(everything.rows, 4);
  EXPECT_EQ(nothing.rows, 0);
  auto [none, whole] = SplitTail(all, 99);
  EXPECT_EQ(none.rows, 0);
  EXPECT_EQ(whole.features, all.features);
}

TEST(EpochPermutationTest, DeterministicPermutationPerEpoch) {
  const std::vector<int64_t> p0 = EpochPermutation(1000, 42, 0);
  std::vector<int64_t> sorted = p0;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < 1000; ++i) ASSERT_EQ(sorted[i], i);
  EXPECT_EQ(p0, EpochPermutation(1000, 42, 0));
  EXPECT_NE(p0, EpochPermutation(1000, 42, 1));
  EXPECT_NE(p0, EpochPermutation(1000, 43, 0));
  int fixed_points = 0;
  for (int64_t i = 0; i < 1000; ++i) fixed_points += p0[i] == i;
  EXPECT_LT(fixed_points, 10);
  EXPECT_TRUE(EpochPermutation(0, 1, 1).empty());
  EXPECT_EQ(EpochPermutation(1, 1, 1), (std::vector<int64_t>{0}));
}

TEST(BatchBufferTest, GathersRequestedRows) {
  Dataset data;
  data.rows = 4;
  data.dim = 3;
  for (int i = 0; i < 12; ++i) data.features.push_back(float(i));
  data.labels = {10, 11, 12, 13};
  BatchBuffer buffer;
  const std::vector<int64_t> rows = {2, 0, 2};
  Batch batch = buffer.Gather(data, rows);
  ASSERT_EQ(batch.rows, 3);
  EXPECT_EQ(std::vector<float>(batch.features, batch.features + 9),
            (std::vector<float>{6, 7, 8, 0, 1, 2, 6, 7, 8}));
  EXPECT_EQ(std::vector<int32_t>(batch.labels, batch.labels + 3),
            (std::vector<int32_t>{12, 10, 12}));
  EXPECT_EQ(batch.targets, nullptr);

  // A smaller batch reuses the same storage.
  const float* storage = batch.features;
  const std::vector<int64_t> one = {3};
  batch = buffer.Gather(data, one);
  EXPECT_EQ(batch.features, storage);
  EXPECT_EQ(batch.features[0], 9.0f);
  EXPECT_EQ(batch.labels[0], 13);

  const Dataset regression = MakeSyntheticRegression(5, 2, 3);
  const std::vector<int64_t> picks = {4, 1};
  batch = buffer.Gather(regression, picks);
  EXPECT_EQ(batch.labels, nullptr);
  ASSERT_NE(batch.targets, nullptr);
  EXPECT_EQ(batch.targets[0], regression.targets[4]);
  EXPECT_EQ(batch.targets[1], regression.targets[1]);
  EXPECT_EQ(batch.features[1], regression.features[9]);

  const Batch view = BatchBuffer::View(data, 1, 2);
  EXPECT_EQ(view.rows, 2);
  EXPECT_EQ(view.features, data.features.data() + 3);
  EXPECT_EQ(view.labels, data.labels.data() + 1);
  EXPECT_EQ(view.targets, nullptr);
}

}  // namespace
}  // namespace tessera
