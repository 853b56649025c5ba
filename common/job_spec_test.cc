#include "common/job_spec.h"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

using tessera::v1::JobSpec;

// A complete, valid job that needs no files.
constexpr char kSyntheticJob[] = R"pb(
  name: "unit"
  model: "mlp:10-100-1"
  loss: MEAN_SQUARED_ERROR
  data { format: SYNTHETIC_REGRESSION num_samples: 1000 validation_fraction: 0.2 }
  optimizer { type: ADAM learning_rate: 0.001 }
  consistency { mode: SYNC }
  batch_size: 16
  epochs: 10
  num_shards: 2
  num_workers: 3
  seed: 7
)pb";

// A path under the test temp dir, unique to the running test.
std::string TempPath(absl::string_view name) {
  const ::testing::TestInfo* info =
      ::testing::UnitTest::GetInstance()->current_test_info();
  return absl::StrCat(::testing::TempDir(), "job_spec_test_",
                      info->test_suite_name(), "_", info->name(), "_", name);
}

std::string WriteFile(absl::string_view name, absl::string_view contents) {
  const std::string path = TempPath(name);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << contents;
  out.close();
  EXPECT_TRUE(out.good()) << path;
  return path;
}

JobSpec SyntheticJob() {
  absl::StatusOr<JobSpec> job = ParseJobSpec(kSyntheticJob, "synthetic");
  EXPECT_TRUE(job.ok()) << job.status();
  return *job;
}

TEST(ParseJobSpecTest, ParsesValidText) {
  absl::StatusOr<JobSpec> job = ParseJobSpec(kSyntheticJob, "synthetic");
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->name(), "unit");
  EXPECT_EQ(job->model(), "mlp:10-100-1");
  EXPECT_EQ(job->loss(), tessera::v1::MEAN_SQUARED_ERROR);
  EXPECT_EQ(job->data().format(), tessera::v1::SYNTHETIC_REGRESSION);
  EXPECT_EQ(job->data().num_samples(), 1000);
  EXPECT_DOUBLE_EQ(job->data().validation_fraction(), 0.2);
  EXPECT_EQ(job->optimizer().type(), tessera::v1::ADAM);
  EXPECT_DOUBLE_EQ(job->optimizer().learning_rate(), 0.001);
  EXPECT_EQ(job->consistency().mode(), tessera::v1::SYNC);
  EXPECT_EQ(job->batch_size(), 16);
  EXPECT_EQ(job->epochs(), 10);
  EXPECT_EQ(job->num_shards(), 2);
  EXPECT_EQ(job->num_workers(), 3);
  EXPECT_EQ(job->seed(), 7u);
  // Parsing does not fill defaults.
  EXPECT_EQ(job->block_bytes(), 0);
  EXPECT_EQ(job->consistency().barrier_timeout_ms(), 0);
}

TEST(ParseJobSpecTest, MisspelledFieldNamesSourceLineAndField) {
  const std::string text =
      "name: \"x\"\n"
      "model: \"mlp:4-2\"\n"
      "batch_size: 8\n"
      "epoch: 3\n"
      "num_shards: 1\n";
  absl::StatusOr<JobSpec> job = ParseJobSpec(text, "my_job.textproto");
  ASSERT_FALSE(job.ok());
  EXPECT_EQ(job.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string message(job.status().message());
  EXPECT_TRUE(absl::StartsWith(message, "my_job.textproto:4:")) << message;
  EXPECT_TRUE(absl::StrContains(message, "\"epoch\"")) << message;
  EXPECT_TRUE(absl::StrContains(message, "tessera.v1.JobSpec")) << message;
}

TEST(ParseJobSpecTest, MisspelledNestedFieldNamesItsLine) {
  const std::string text =
      "model: \"mlp:4-2\"\n"
      "optimizer {\n"
      "  type: SGD\n"
      "  learning_rte: 0.1\n"
      "}\n";
  absl::StatusOr<JobSpec> job = ParseJobSpec(text, "nested.textproto");
  ASSERT_FALSE(job.ok());
  const std::string message(job.status().message());
  EXPECT_TRUE(absl::StartsWith(message, "nested.textproto:4:")) << message;
  EXPECT_TRUE(absl::StrContains(message, "\"learning_rte\"")) << message;
}

TEST(ParseJobSpecTest, BadEnumValue) {
  const std::string text =
      "model: \"mlp:4-2\"\n"
      "loss: SOFTMAX\n";
  absl::StatusOr<JobSpec> job = ParseJobSpec(text, "enum.textproto");
  ASSERT_FALSE(job.ok());
  EXPECT_EQ(job.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string message(job.status().message());
  // The parser reports the position after the bad value, so only the source
  // is checked here, not the line.
  EXPECT_TRUE(absl::StartsWith(message, "enum.textproto:")) << message;
  EXPECT_TRUE(absl::StrContains(message, "\"SOFTMAX\"")) << message;
  EXPECT_TRUE(absl::StrContains(message, "\"loss\"")) << message;

  absl::StatusOr<JobSpec> mode =
      ParseJobSpec("consistency { mode: BSP }", "mode.textproto");
  ASSERT_FALSE(mode.ok());
  EXPECT_TRUE(absl::StrContains(mode.status().message(), "BSP"))
      << mode.status();
}

TEST(ParseJobSpecTest, SyntaxErrorNamesSource) {
  absl::StatusOr<JobSpec> job =
      ParseJobSpec("model: \"mlp:4-2\"\nbatch_size: {\n", "broken.textproto");
  ASSERT_FALSE(job.ok());
  EXPECT_EQ(job.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StartsWith(job.status().message(), "broken.textproto:"))
      << job.status();
}

TEST(ValidateJobSpecTest, AcceptsValidJobAndFillsDefaults) {
  JobSpec job = SyntheticJob();
  ASSERT_TRUE(ValidateJobSpec(&job).ok());
  EXPECT_EQ(job.block_bytes(), 262144);
  EXPECT_EQ(job.consistency().barrier_timeout_ms(), 60000);
  // Validation changes nothing else.
  EXPECT_EQ(job.batch_size(), 16);
  EXPECT_EQ(job.num_workers(), 3);
  EXPECT_EQ(job.consistency().mode(), tessera::v1::SYNC);
}

TEST(ValidateJobSpecTest, KeepsExplicitValues) {
  JobSpec job = SyntheticJob();
  job.set_block_bytes(4096);
  job.mutable_consistency()->set_barrier_timeout_ms(1500);
  ASSERT_TRUE(ValidateJobSpec(&job).ok());
  EXPECT_EQ(job.block_bytes(), 4096);
  EXPECT_EQ(job.consistency().barrier_timeout_ms(), 1500);
}

TEST(ValidateJobSpecTest, ErrorsNameTheField) {
  struct Case {
    const char* what;
    std::function<void(JobSpec*)> mutate;
    const char* expected_prefix;
  };
  const double kNaN = std::numeric_limits<double>::quiet_NaN();
  const double kInf = std::numeric_limits<double>::infinity();
  const std::vector<Case> cases = {
      {"missing model", [](JobSpec* j) { j->clear_model(); }, "job.model:"},
      {"bad model spec", [](JobSpec* j) { j->set_model("mlp:10-abc-1"); },
       "job.model:"},
      {"unknown model kind", [](JobSpec* j) { j->set_model("cnn:10-1"); },
       "job.model:"},
      {"softmax with one output",
       [](JobSpec* j) { j->set_loss(tessera::v1::SOFTMAX_CROSS_ENTROPY); },
       "job.model:"},
      {"missing loss", [](JobSpec* j) { j->clear_loss(); }, "job.loss:"},
      {"batch_size 0", [](JobSpec* j) { j->set_batch_size(0); },
       "job.batch_size: must be positive, got 0"},
      {"batch_size -4", [](JobSpec* j) { j->set_batch_size(-4); },
       "job.batch_size:"},
      {"epochs 0", [](JobSpec* j) { j->set_epochs(0); }, "job.epochs:"},
      {"num_shards 0", [](JobSpec* j) { j->set_num_shards(0); },
       "job.num_shards:"},
      {"num_shards 1025", [](JobSpec* j) { j->set_num_shards(1025); },
       "job.num_shards:"},
      {"num_workers 0", [](JobSpec* j) { j->set_num_workers(0); },
       "job.num_workers:"},
      {"negative max_steps", [](JobSpec* j) { j->set_max_steps(-1); },
       "job.max_steps:"},
      {"block_bytes 2", [](JobSpec* j) { j->set_block_bytes(2); },
       "job.block_bytes:"},
      {"missing consistency.mode",
       [](JobSpec* j) { j->mutable_consistency()->clear_mode(); },
       "job.consistency.mode:"},
      {"missing consistency",
       [](JobSpec* j) { j->clear_consistency(); }, "job.consistency.mode:"},
      {"negative staleness",
       [](JobSpec* j) {
         j->mutable_consistency()->set_mode(tessera::v1::SSP);
         j->mutable_consistency()->set_staleness(-1);
       },
       "job.consistency.staleness:"},
      {"negative backup_workers",
       [](JobSpec* j) { j->mutable_consistency()->set_backup_workers(-1); },
       "job.consistency.backup_workers: must not be negative, got -1"},
      {"backup_workers with ASYNC",
       [](JobSpec* j) {
         j->set_num_workers(3);
         j->mutable_consistency()->set_mode(tessera::v1::ASYNC);
         j->mutable_consistency()->set_backup_workers(1);
       },
       "job.consistency.backup_workers: only synchronous steps wait for workers: needs mode "
       "SYNC, got ASYNC"},
      {"as many backup workers as workers",
       [](JobSpec* j) {
         j->set_num_workers(2);
         j->mutable_consistency()->set_backup_workers(2);
       },
       "job.consistency.backup_workers: must be less than num_workers (2), got 2"},
      {"negative barrier timeout",
       [](JobSpec* j) { j->mutable_consistency()->set_barrier_timeout_ms(-5); },
       "job.consistency.barrier_timeout_ms:"},
      {"missing optimizer.type",
       [](JobSpec* j) { j->mutable_optimizer()->clear_type(); },
       "job.optimizer.type:"},
      {"learning_rate 0",
       [](JobSpec* j) { j->mutable_optimizer()->set_learning_rate(0); },
       "job.optimizer.learning_rate:"},
      {"learning_rate negative",
       [](JobSpec* j) { j->mutable_optimizer()->set_learning_rate(-0.1); },
       "job.optimizer.learning_rate:"},
      {"learning_rate NaN",
       [kNaN](JobSpec* j) { j->mutable_optimizer()->set_learning_rate(kNaN); },
       "job.optimizer.learning_rate:"},
      {"learning_rate Inf",
       [kInf](JobSpec* j) { j->mutable_optimizer()->set_learning_rate(kInf); },
       "job.optimizer.learning_rate:"},
      {"missing data format",
       [](JobSpec* j) { j->mutable_data()->clear_format(); },
       "job.data.format:"},
      {"synthetic num_samples 1",
       [](JobSpec* j) { j->mutable_data()->set_num_samples(1); },
       "job.data.num_samples: must be at least 2, got 1"},
      {"validation_fraction 0",
       [](JobSpec* j) { j->mutable_data()->set_validation_fraction(0); },
       "job.data.validation_fraction:"},
      {"validation_fraction 1",
       [](JobSpec* j) { j->mutable_data()->set_validation_fraction(1); },
       "job.data.validation_fraction:"},
      {"validation_fraction 1.5",
       [](JobSpec* j) { j->mutable_data()->set_validation_fraction(1.5); },
       "job.data.validation_fraction:"},
      {"validation_fraction negative",
       [](JobSpec* j) { j->mutable_data()->set_validation_fraction(-0.2); },
       "job.data.validation_fraction:"},
      {"validation_fraction NaN",
       [kNaN](JobSpec* j) { j->mutable_data()->set_validation_fraction(kNaN); },
       "job.data.validation_fraction:"},
      {"negative checkpoint.every_seconds",
       [](JobSpec* j) { j->mutable_checkpoint()->set_every_seconds(-1); },
       "job.checkpoint.every_seconds:"},
      {"top_k_fraction above 1", [](JobSpec* j) { j->set_top_k_fraction(1.5); },
       "job.top_k_fraction: must be in [0, 1]"},
      {"negative top_k_fraction", [](JobSpec* j) { j->set_top_k_fraction(-0.1); },
       "job.top_k_fraction:"},
      {"top_k_fraction NaN", [kNaN](JobSpec* j) { j->set_top_k_fraction(kNaN); },
       "job.top_k_fraction:"},
  };
  for (const Case& c : cases) {
    JobSpec job = SyntheticJob();
    c.mutate(&job);
    absl::Status status = ValidateJobSpec(&job);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.what;
    EXPECT_TRUE(absl::StartsWith(status.message(), c.expected_prefix))
        << c.what << ": " << status;
  }
}

TEST(ValidateJobSpecTest, BadModelSpecMessageQuotesTheSpec) {
  JobSpec job = SyntheticJob();
  job.set_model("mlp:10-abc-1");
  absl::Status status = ValidateJobSpec(&job);
  EXPECT_TRUE(absl::StrContains(status.message(), "mlp:10-abc-1")) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "'abc'")) << status;
}

TEST(ValidateJobSpecTest, ZeroStalenessIsAllowed) {
  JobSpec job = SyntheticJob();
  job.mutable_consistency()->set_mode(tessera::v1::SSP);
  job.mutable_consistency()->set_staleness(0);
  EXPECT_TRUE(ValidateJobSpec(&job).ok());
}

class IdxValidationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    train_images_ = WriteFile("train-images", "x");
    train_labels_ = WriteFile("train-labels", "x");
    test_images_ = WriteFile("test-images", "x");
    test_labels_ = WriteFile("test-labels", "x");
  }

  JobSpec IdxJob() const {
    JobSpec job;
    job.set_model("mlp:784-32-10");
    job.set_loss(tessera::v1::SOFTMAX_CROSS_ENTROPY);
    tessera::v1::DataSpec* d = job.mutable_data();
    d->set_format(tessera::v1::IDX);
    d->set_train_images(train_images_);
    d->set_train_labels(train_labels_);
    d->set_test_images(test_images_);
    d->set_test_labels(test_labels_);
    job.mutable_optimizer()->set_type(tessera::v1::SGD);
    job.mutable_optimizer()->set_learning_rate(0.1);
    job.mutable_consistency()->set_mode(tessera::v1::ASYNC);
    job.set_batch_size(32);
    job.set_epochs(1);
    job.set_num_shards(1);
    job.set_num_workers(1);
    return job;
  }

  std::string train_images_, train_labels_, test_images_, test_labels_;
};

TEST_F(IdxValidationTest, AcceptsExistingFiles) {
  JobSpec job = IdxJob();
  absl::Status status = ValidateJobSpec(&job);
  EXPECT_TRUE(status.ok()) << status;
}

TEST_F(IdxValidationTest, MissingFileNamesFieldAndPath) {
  struct Case {
    const char* field;
    std::function<void(tessera::v1::DataSpec*, const std::string&)> set;
  };
  const std::vector<Case> cases = {
      {"data.train_images",
       [](tessera::v1::DataSpec* d, const std::string& p) {
         d->set_train_images(p);
       }},
      {"data.train_labels",
       [](tessera::v1::DataSpec* d, const std::string& p) {
         d->set_train_labels(p);
       }},
      {"data.test_images",
       [](tessera::v1::DataSpec* d, const std::string& p) {
         d->set_test_images(p);
       }},
      {"data.test_labels",
       [](tessera::v1::DataSpec* d, const std::string& p) {
         d->set_test_labels(p);
       }},
  };
  for (const Case& c : cases) {
    const std::string missing = TempPath(absl::StrCat("missing-", c.field));
    std::remove(missing.c_str());
    JobSpec job = IdxJob();
    c.set(job.mutable_data(), missing);
    absl::Status status = ValidateJobSpec(&job);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_TRUE(
        absl::StartsWith(status.message(), absl::StrCat("job.", c.field, ":")))
        << status;
    EXPECT_TRUE(absl::StrContains(status.message(), missing)) << status;
  }
}

TEST_F(IdxValidationTest, EmptyPathNamesField) {
  JobSpec job = IdxJob();
  job.mutable_data()->clear_train_labels();
  absl::Status status = ValidateJobSpec(&job);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StartsWith(status.message(), "job.data.train_labels:"))
      << status;
}

TEST(ApplyOverridesTest, EmptyOverridesChangeNothing) {
  JobSpec job = SyntheticJob();
  const std::string before = job.DebugString();
  ASSERT_TRUE(ApplyOverrides(JobOverrides(), &job).ok());
  EXPECT_EQ(job.DebugString(), before);
}

TEST(ApplyOverridesTest, OverridesEveryField) {
  JobSpec job = SyntheticJob();
  JobOverrides o;
  o.epochs = 4;
  o.batch_size = 64;
  o.num_workers = 5;
  o.num_shards = 6;
  o.mode = "ssp";
  o.staleness = 3;
  o.learning_rate = 0.25;
  o.seed = 123456789012345ull;
  o.max_steps = 77;
  ASSERT_TRUE(ApplyOverrides(o, &job).ok());
  EXPECT_EQ(job.epochs(), 4);
  EXPECT_EQ(job.batch_size(), 64);
  EXPECT_EQ(job.num_workers(), 5);
  EXPECT_EQ(job.num_shards(), 6);
  EXPECT_EQ(job.consistency().mode(), tessera::v1::SSP);
  EXPECT_EQ(job.consistency().staleness(), 3);
  EXPECT_DOUBLE_EQ(job.optimizer().learning_rate(), 0.25);
  EXPECT_EQ(job.seed(), 123456789012345ull);
  EXPECT_EQ(job.max_steps(), 77);
  // Fields without an override keep the file's value.
  EXPECT_EQ(job.model(), "mlp:10-100-1");
  EXPECT_EQ(job.optimizer().type(), tessera::v1::ADAM);
  EXPECT_EQ(job.data().num_samples(), 1000);
}

TEST(ApplyOverridesTest, EachOverrideAlone) {
  {
    JobSpec job = SyntheticJob();
    JobOverrides o;
    o.epochs = 2;
    ASSERT_TRUE(ApplyOverrides(o, &job).ok());
    EXPECT_EQ(job.epochs(), 2);
    EXPECT_EQ(job.batch_size(), 16);
  }
  {
    JobSpec job = SyntheticJob();
    JobOverrides o;
    o.batch_size = 1;
    ASSERT_TRUE(ApplyOverrides(o, &job).ok());
    EXPECT_EQ(job.batch_size(), 1);
    EXPECT_EQ(job.epochs(), 10);
  }
  {
    JobSpec job = SyntheticJob();
    JobOverrides o;
    o.staleness = 2;
    ASSERT_TRUE(ApplyOverrides(o, &job).ok());
    EXPECT_EQ(job.consistency().staleness(), 2);
    EXPECT_EQ(job.consistency().mode(), tessera::v1::SYNC);
  }
  {
    JobSpec job = SyntheticJob();
    JobOverrides o;
    o.backup_workers = 1;
    ASSERT_TRUE(ApplyOverrides(o, &job).ok());
    EXPECT_EQ(job.consistency().backup_workers(), 1);
    EXPECT_EQ(job.consistency().staleness(), 0);
  }
  {
    JobSpec job = SyntheticJob();
    JobOverrides o;
    o.seed = 0;
    ASSERT_TRUE(ApplyOverrides(o, &job).ok());
    EXPECT_EQ(job.seed(), 0u);
  }
}

TEST(ApplyOverridesTest, WireDtypeNamesEachType) {
  for (const auto& [name, dtype] :
       std::vector<std::pair<std::string, tessera::v1::DType>>{
           {"f32", tessera::v1::F32}, {"BF16", tessera::v1::BF16}, {"f16", tessera::v1::F16}}) {
    JobSpec job = SyntheticJob();
    JobOverrides o;
    o.wire_dtype = name;
    ASSERT_TRUE(ApplyOverrides(o, &job).ok()) << name;
    EXPECT_EQ(job.wire_dtype(), dtype) << name;
    EXPECT_TRUE(ValidateJobSpec(&job).ok()) << name;
  }
  JobSpec job = SyntheticJob();
  JobOverrides o;
  o.wire_dtype = "fp8";
  const absl::Status s = ApplyOverrides(o, &job);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("--wire_dtype: expected f32, bf16 or f16, got 'fp8'"),
            std::string::npos)
      << s.message();
}

TEST(ApplyOverridesTest, ModeNamesAreCaseInsensitive) {
  const std::vector<std::pair<std::string, tessera::v1::ConsistencyMode>>
      cases = {{"sync", tessera::v1::SYNC},   {"SYNC", tessera::v1::SYNC},
               {"async", tessera::v1::ASYNC}, {"ASYNC", tessera::v1::ASYNC},
               {"ssp", tessera::v1::SSP},     {"Ssp", tessera::v1::SSP}};
  for (const auto& [name, mode] : cases) {
    JobSpec job = SyntheticJob();
    JobOverrides o;
    o.mode = name;
    ASSERT_TRUE(ApplyOverrides(o, &job).ok()) << name;
    EXPECT_EQ(job.consistency().mode(), mode) << name;
  }
}

TEST(ApplyOverridesTest, BadModeNamesTheFlag) {
  for (const char* bad : {"bsp", "", "sync "}) {
    JobSpec job = SyntheticJob();
    JobOverrides o;
    o.mode = bad;
    absl::Status status = ApplyOverrides(o, &job);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_TRUE(absl::StrContains(status.message(), "--mode")) << status;
    EXPECT_TRUE(absl::StrContains(status.message(), absl::StrCat("'", bad, "'")))
        << status;
    EXPECT_EQ(job.consistency().mode(), tessera::v1::SYNC) << bad;
  }
}

TEST(ModeNameTest, NamesEveryMode) {
  EXPECT_EQ(ModeName(tessera::v1::SYNC), "sync");
  EXPECT_EQ(ModeName(tessera::v1::ASYNC), "async");
  EXPECT_EQ(ModeName(tessera::v1::SSP), "ssp");
  EXPECT_EQ(ModeName(tessera::v1::CONSISTENCY_MODE_UNSPECIFIED), "unspecified");
}

TEST(LoadJobTest, MissingFileIsNotFound) {
  const std::string path = TempPath("does-not-exist.textproto");
  std::remove(path.c_str());
  absl::StatusOr<JobSpec> job = LoadJob(path, JobOverrides());
  ASSERT_FALSE(job.ok());
  EXPECT_EQ(job.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(job.status().message(), path)) << job.status();

  absl::StatusOr<JobSpec> read = ReadJobSpecFile(path);
  EXPECT_EQ(read.status().code(), absl::StatusCode::kNotFound);
}

TEST(LoadJobTest, LoadsAppliesOverridesAndValidates) {
  const std::string path = WriteFile("job.textproto", kSyntheticJob);
  JobOverrides o;
  o.epochs = 2;
  o.mode = "ASYNC";
  absl::StatusOr<JobSpec> job = LoadJob(path, o);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->epochs(), 2);
  EXPECT_EQ(job->consistency().mode(), tessera::v1::ASYNC);
  EXPECT_EQ(job->block_bytes(), 262144);
  EXPECT_EQ(job->consistency().barrier_timeout_ms(), 60000);
  EXPECT_EQ(job->model(), "mlp:10-100-1");
}

TEST(LoadJobTest, ValidationErrorsArePrefixedWithThePath) {
  std::string text = kSyntheticJob;
  const std::string from = "batch_size: 16";
  const size_t at = text.find(from);
  ASSERT_NE(at, std::string::npos);
  text.replace(at, from.size(), "batch_size: 0");
  const std::string path = WriteFile("bad.textproto", text);
  absl::StatusOr<JobSpec> job = LoadJob(path, JobOverrides());
  ASSERT_FALSE(job.ok());
  EXPECT_EQ(job.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(std::string(job.status().message()),
            absl::StrCat(path, ": job.batch_size: must be positive, got 0"));
}

TEST(LoadJobTest, OverrideCanMakeAJobInvalid) {
  const std::string path = WriteFile("job.textproto", kSyntheticJob);
  JobOverrides o;
  o.num_workers = 0;
  absl::StatusOr<JobSpec> job = LoadJob(path, o);
  ASSERT_FALSE(job.ok());
  EXPECT_TRUE(absl::StartsWith(job.status().message(),
                               absl::StrCat(path, ": job.num_workers:")))
      << job.status();
}

TEST(LoadJobTest, ParseErrorsArePrefixedWithThePath) {
  const std::string path =
      WriteFile("typo.textproto", "model: \"mlp:4-2\"\nepoch: 3\n");
  absl::StatusOr<JobSpec> job = LoadJob(path, JobOverrides());
  ASSERT_FALSE(job.ok());
  EXPECT_EQ(job.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StartsWith(job.status().message(), absl::StrCat(path, ":2:")))
      << job.status();
  EXPECT_TRUE(absl::StrContains(job.status().message(), "\"epoch\""))
      << job.status();
}

TEST(LoadJobTest, BadModeOverrideFails) {
  const std::string path = WriteFile("job.textproto", kSyntheticJob);
  JobOverrides o;
  o.mode = "lockstep";
  absl::StatusOr<JobSpec> job = LoadJob(path, o);
  ASSERT_FALSE(job.ok());
  EXPECT_EQ(job.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(job.status().message(), "--mode"))
      << job.status();
}

TEST(JobHashTest, EqualForEqualJobs) {
  JobSpec a = SyntheticJob();
  JobSpec b = SyntheticJob();
  EXPECT_EQ(JobHash(a), JobHash(b));
  ASSERT_TRUE(ValidateJobSpec(&a).ok());
  ASSERT_TRUE(ValidateJobSpec(&b).ok());
  EXPECT_EQ(JobHash(a), JobHash(b));

  // Two processes reading two copies of the file with the same overrides.
  const std::string p1 = WriteFile("one.textproto", kSyntheticJob);
  const std::string p2 = WriteFile("two.textproto", kSyntheticJob);
  JobOverrides o;
  o.seed = 99;
  absl::StatusOr<JobSpec> j1 = LoadJob(p1, o);
  absl::StatusOr<JobSpec> j2 = LoadJob(p2, o);
  ASSERT_TRUE(j1.ok()) << j1.status();
  ASSERT_TRUE(j2.ok()) << j2.status();
  EXPECT_EQ(JobHash(*j1), JobHash(*j2));
  EXPECT_NE(JobHash(*j1), JobHash(a));
}

TEST(JobHashTest, DiffersWhenAnyFieldDiffers) {
  const std::vector<std::function<void(JobSpec*)>> mutations = {
      [](JobSpec* j) { j->set_seed(8); },
      [](JobSpec* j) { j->set_batch_size(17); },
      [](JobSpec* j) { j->set_epochs(11); },
      [](JobSpec* j) { j->set_num_shards(3); },
      [](JobSpec* j) { j->set_num_workers(4); },
      [](JobSpec* j) { j->set_name("unit2"); },
      [](JobSpec* j) { j->set_model("mlp:10-101-1"); },
      [](JobSpec* j) { j->set_block_bytes(4096); },
      [](JobSpec* j) { j->set_max_steps(5); },
      [](JobSpec* j) { j->set_loss(tessera::v1::SOFTMAX_CROSS_ENTROPY); },
      [](JobSpec* j) { j->mutable_optimizer()->set_learning_rate(0.002); },
      [](JobSpec* j) { j->mutable_optimizer()->set_type(tessera::v1::ADAMW); },
      [](JobSpec* j) { j->mutable_optimizer()->set_weight_decay(1e-4); },
      [](JobSpec* j) { j->mutable_consistency()->set_mode(tessera::v1::SSP); },
      [](JobSpec* j) { j->mutable_consistency()->set_staleness(1); },
      [](JobSpec* j) { j->mutable_consistency()->set_backup_workers(1); },
      [](JobSpec* j) { j->mutable_data()->set_num_samples(1001); },
      [](JobSpec* j) { j->mutable_data()->set_validation_fraction(0.25); },
  };
  const JobSpec base = SyntheticJob();
  std::set<uint64_t> hashes = {JobHash(base)};
  for (size_t i = 0; i < mutations.size(); ++i) {
    JobSpec job = base;
    mutations[i](&job);
    EXPECT_NE(JobHash(job), JobHash(base)) << "mutation " << i;
    hashes.insert(JobHash(job));
  }
  EXPECT_EQ(hashes.size(), mutations.size() + 1);
}

TEST(JobHashTest, CheckpointPolicyIsLeftOut) {
  const JobSpec base = SyntheticJob();
  JobSpec job = base;
  job.mutable_checkpoint()->set_dir("/tmp/ckpt");
  job.mutable_checkpoint()->set_every_steps(5);
  job.mutable_checkpoint()->set_every_seconds(60);
  EXPECT_EQ(JobHash(job), JobHash(base));
}

}  // namespace
}  // namespace tessera
