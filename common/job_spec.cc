#include "common/job_spec.h"

#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/model_spec.h"
#include "common/status_macros.h"
#include "common/tensor_codec.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "google/protobuf/text_format.h"

namespace tessera {
namespace {

using tessera::v1::JobSpec;

constexpr int64_t kDefaultBlockBytes = 256 * 1024;
constexpr int64_t kDefaultBarrierTimeoutMs = 60000;

// Collects the first parse error with its position, so that the message a
// user sees names the line, column and offending field.
class FirstErrorCollector : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, int column, const std::string& message) override {
    if (error_.empty()) {
      error_ = absl::StrCat(line + 1, ":", column + 1, ": ", message);
    }
  }
  void AddWarning(int line, int column, const std::string& message) override {}
  const std::string& error() const { return error_; }

 private:
  std::string error_;
};

absl::Status FieldError(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("job.", field, ": ", what));
}

bool FileReadable(const std::string& path) {
  std::ifstream f(path);
  return f.good();
}

absl::Status RequireFile(absl::string_view field, const std::string& path) {
  if (path.empty()) return FieldError(field, "required for this data format");
  if (!FileReadable(path)) {
    return FieldError(field, absl::StrCat("cannot read file '", path, "'"));
  }
  return absl::OkStatus();
}

absl::Status ValidateData(JobSpec* job) {
  tessera::v1::DataSpec* d = job->mutable_data();
  switch (d->format()) {
    case tessera::v1::IDX:
      TESSERA_RETURN_IF_ERROR(RequireFile("data.train_images", d->train_images()));
      TESSERA_RETURN_IF_ERROR(RequireFile("data.train_labels", d->train_labels()));
      TESSERA_RETURN_IF_ERROR(RequireFile("data.test_images", d->test_images()));
      TESSERA_RETURN_IF_ERROR(RequireFile("data.test_labels", d->test_labels()));
      break;
    case tessera::v1::CSV:
    case tessera::v1::LIBSVM:
      TESSERA_RETURN_IF_ERROR(RequireFile("data.train_path", d->train_path()));
      if (!d->test_path().empty()) {
        TESSERA_RETURN_IF_ERROR(RequireFile("data.test_path", d->test_path()));
      } else if (!(d->validation_fraction() > 0 && d->validation_fraction() < 1)) {
        return FieldError("data.validation_fraction",
                          "must be in (0, 1) when data.test_path is empty");
      }
      if (d->num_features() < 0) {
        return FieldError("data.num_features", "must not be negative");
      }
      break;
    case tessera::v1::SYNTHETIC_REGRESSION:
      if (d->num_samples() <= 1) {
        return FieldError("data.num_samples",
                          absl::StrCat("must be at least 2, got ", d->num_samples()));
      }
      if (!(d->validation_fraction() > 0 && d->validation_fraction() < 1)) {
        return FieldError("data.validation_fraction",
                          absl::StrCat("must be in (0, 1), got ",
                                       d->validation_fraction()));
      }
      break;
    default:
      return FieldError("data.format",
                        "must be one of IDX, CSV, LIBSVM, SYNTHETIC_REGRESSION");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<JobSpec> ParseJobSpec(absl::string_view text,
                                     absl::string_view source) {
  JobSpec job;
  google::protobuf::TextFormat::Parser parser;
  FirstErrorCollector errors;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(std::string(text), &job)) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ":", errors.error().empty() ? "?: parse error"
                                                         : errors.error()));
  }
  return job;
}

absl::StatusOr<JobSpec> ReadJobSpecFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot open job file '", path, "'"));
  }
  std::stringstream buffer;
  buffer << in.rdbuf();
  return ParseJobSpec(buffer.str(), path);
}

absl::Status ApplyOverrides(const JobOverrides& o, JobSpec* job) {
  if (o.epochs) job->set_epochs(*o.epochs);
  if (o.batch_size) job->set_batch_size(*o.batch_size);
  if (o.num_workers) job->set_num_workers(*o.num_workers);
  if (o.num_shards) job->set_num_shards(*o.num_shards);
  if (o.staleness) job->mutable_consistency()->set_staleness(*o.staleness);
  if (o.backup_workers) job->mutable_consistency()->set_backup_workers(*o.backup_workers);
  if (o.learning_rate) job->mutable_optimizer()->set_learning_rate(*o.learning_rate);
  if (o.seed) job->set_seed(*o.seed);
  if (o.max_steps) job->set_max_steps(*o.max_steps);
  if (o.checkpoint_dir) job->mutable_checkpoint()->set_dir(*o.checkpoint_dir);
  if (o.wire_dtype) {
    const std::string w = absl::AsciiStrToLower(*o.wire_dtype);
    if (w == "f32") {
      job->set_wire_dtype(tessera::v1::F32);
    } else if (w == "bf16") {
      job->set_wire_dtype(tessera::v1::BF16);
    } else if (w == "f16") {
      job->set_wire_dtype(tessera::v1::F16);
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("--wire_dtype: expected f32, bf16 or f16, got '", *o.wire_dtype, "'"));
    }
  }
  if (o.top_k_fraction) job->set_top_k_fraction(*o.top_k_fraction);
  if (o.overlap) job->set_overlap(*o.overlap);
  if (o.checkpoint_every_steps) {
    job->mutable_checkpoint()->set_every_steps(*o.checkpoint_every_steps);
  }
  if (o.checkpoint_every_seconds) {
    job->mutable_checkpoint()->set_every_seconds(*o.checkpoint_every_seconds);
  }
  if (o.mode) {
    std::string m = absl::AsciiStrToLower(*o.mode);
    tessera::v1::ConsistencyMode mode;
    if (m == "sync") {
      mode = tessera::v1::SYNC;
    } else if (m == "async") {
      mode = tessera::v1::ASYNC;
    } else if (m == "ssp") {
      mode = tessera::v1::SSP;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("--mode: expected sync, async or ssp, got '", *o.mode, "'"));
    }
    job->mutable_consistency()->set_mode(mode);
  }
  return absl::OkStatus();
}

absl::Status ValidateJobSpec(JobSpec* job) {
  if (job->model().empty()) return FieldError("model", "required, e.g. \"mlp:784-256-128-10\"");
  if (job->loss() == tessera::v1::LOSS_UNSPECIFIED) {
    return FieldError("loss", "required: SOFTMAX_CROSS_ENTROPY or MEAN_SQUARED_ERROR");
  }
  LossKind loss = job->loss() == tessera::v1::SOFTMAX_CROSS_ENTROPY
                      ? LossKind::kSoftmaxCrossEntropy
                      : LossKind::kMeanSquaredError;
  absl::StatusOr<ModelSpec> model = ParseModelSpec(job->model(), loss);
  if (!model.ok()) return FieldError("model", model.status().message());
  if (loss == LossKind::kSoftmaxCrossEntropy && model->output_dim() < 2) {
    return FieldError("model", "softmax cross-entropy needs at least 2 outputs");
  }
  if (job->batch_size() <= 0) {
    return FieldError("batch_size", absl::StrCat("must be positive, got ", job->batch_size()));
  }
  if (job->epochs() <= 0) {
    return FieldError("epochs", absl::StrCat("must be positive, got ", job->epochs()));
  }
  if (job->num_shards() <= 0 || job->num_shards() > 1024) {
    return FieldError("num_shards",
                      absl::StrCat("must be in [1, 1024], got ", job->num_shards()));
  }
  if (job->num_workers() <= 0 || job->num_workers() > 65536) {
    return FieldError("num_workers",
                      absl::StrCat("must be in [1, 65536], got ", job->num_workers()));
  }
  if (job->max_steps() < 0) {
    return FieldError("max_steps", "must not be negative");
  }
  if (!(job->top_k_fraction() >= 0.0 && job->top_k_fraction() <= 1.0)) {
    return FieldError("top_k_fraction",
                      absl::StrCat("must be in [0, 1] (0: dense pushes), got ",
                                   job->top_k_fraction()));
  }
  if (job->checkpoint().every_steps() < 0) {
    return FieldError("checkpoint.every_steps", "must not be negative");
  }
  if (job->checkpoint().every_seconds() < 0) {
    return FieldError("checkpoint.every_seconds", "must not be negative");
  }
  if (job->checkpoint().keep() < 0) {
    return FieldError("checkpoint.keep", "must not be negative");
  }
  if (job->block_bytes() == 0) job->set_block_bytes(kDefaultBlockBytes);
  if (job->block_bytes() < 4 || job->block_bytes() > (64 << 20)) {
    return FieldError("block_bytes",
                      absl::StrCat("must be in [4, 67108864], got ", job->block_bytes()));
  }
  tessera::v1::ConsistencySpec* c = job->mutable_consistency();
  if (c->mode() == tessera::v1::CONSISTENCY_MODE_UNSPECIFIED) {
    return FieldError("consistency.mode", "required: SYNC, ASYNC or SSP");
  }
  if (c->staleness() < 0) {
    return FieldError("consistency.staleness", "must not be negative");
  }
  if (c->backup_workers() < 0) {
    return FieldError("consistency.backup_workers",
                      absl::StrCat("must not be negative, got ", c->backup_workers()));
  }
  if (c->backup_workers() > 0 && c->mode() != tessera::v1::SYNC) {
    return FieldError("consistency.backup_workers",
                      absl::StrCat("only synchronous steps wait for workers: needs mode SYNC, got ",
                                   tessera::v1::ConsistencyMode_Name(c->mode())));
  }
  if (c->backup_workers() > 0 && c->backup_workers() >= job->num_workers()) {
    return FieldError("consistency.backup_workers",
                      absl::StrCat("must be less than num_workers (", job->num_workers(), "), got ",
                                   c->backup_workers()));
  }
  if (c->barrier_timeout_ms() == 0) c->set_barrier_timeout_ms(kDefaultBarrierTimeoutMs);
  if (c->barrier_timeout_ms() < 0) {
    return FieldError("consistency.barrier_timeout_ms", "must be positive");
  }
  if (job->wire_dtype() == tessera::v1::DTYPE_UNSPECIFIED) job->set_wire_dtype(tessera::v1::F32);
  if (!IsWireDType(job->wire_dtype())) {
    return FieldError("wire_dtype", absl::StrCat("must be F32, BF16 or F16, got ",
                                                 tessera::v1::DType_Name(job->wire_dtype())));
  }
  const tessera::v1::OptimizerSpec& opt = job->optimizer();
  if (opt.type() == tessera::v1::OPTIMIZER_TYPE_UNSPECIFIED) {
    return FieldError("optimizer.type", "required: SGD, MOMENTUM, ADAM, ADAMW or ADAGRAD");
  }
  if (!(opt.learning_rate() > 0) || !std::isfinite(opt.learning_rate())) {
    return FieldError("optimizer.learning_rate",
                      absl::StrCat("must be positive and finite, got ", opt.learning_rate()));
  }
  return ValidateData(job);
}

absl::StatusOr<JobSpec> LoadJob(const std::string& path,
                                const JobOverrides& overrides) {
  TESSERA_ASSIGN_OR_RETURN(JobSpec job, ReadJobSpecFile(path));
  TESSERA_RETURN_IF_ERROR(ApplyOverrides(overrides, &job));
  TESSERA_RETURN_IF_ERROR(Annotate(ValidateJobSpec(&job), path));
  return job;
}

uint64_t JobHash(const JobSpec& job) {
  // The checkpoint policy is the servers' business alone: a worker started
  // without --checkpoint_dir still runs the same job.
  JobSpec hashed = job;
  hashed.clear_checkpoint();
  std::string bytes;
  google::protobuf::io::StringOutputStream stream(&bytes);
  {
    google::protobuf::io::CodedOutputStream coded(&stream);
    coded.SetSerializationDeterministic(true);
    hashed.SerializeToCodedStream(&coded);
  }
  // FNV-1a: stable across processes and builds, unlike std::hash.
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

std::string ModeName(tessera::v1::ConsistencyMode mode) {
  switch (mode) {
    case tessera::v1::SYNC:
      return "sync";
    case tessera::v1::ASYNC:
      return "async";
    case tessera::v1::SSP:
      return "ssp";
    default:
      return "unspecified";
  }
}

}  // namespace tessera
