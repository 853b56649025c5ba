// Fuzzes the job file path every process takes at start-up: text-format
// parsing (ParseJobSpec) and validation (ValidateJobSpec).
//
// Data file names are mapped into a scratch folder first (a name without a
// '/' is kept, under that folder, where only "train.csv" and "test.csv"
// exist; anything else becomes a missing file), so that validation's
// readability checks never open arbitrary paths such as a FIFO.
//
// Invariants: no crash or sanitizer report; a parse error starts with the
// source name; a validation error is kInvalidArgument and starts with
// "job."; a job that validates has every checked field in range, validates
// again unchanged, and survives a text round trip with the same JobHash.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/job_spec.h"
#include "common/model_spec.h"
#include "fuzz/fuzz_util.h"
#include "google/protobuf/stubs/logging.h"
#include "google/protobuf/text_format.h"

namespace tessera::fuzz {
namespace {

constexpr char kSource[] = "fuzz.textproto";

const std::string& DataDir() {
  static ScratchDir dir("job-spec-fuzz");
  static const bool filled = [] {
    WriteFile(dir.path() + "/train.csv", "1,2\n3,4\n");
    WriteFile(dir.path() + "/test.csv", "5,6\n");
    return true;
  }();
  (void)filled;
  return dir.path();
}

void MapPath(std::string* path) {
  if (path->empty()) return;
  if (path->find('/') != std::string::npos || *path == "." || *path == "..") {
    *path = DataDir() + "/missing";
  } else {
    *path = absl::StrCat(DataDir(), "/", *path);
  }
}

void MapPaths(tessera::v1::JobSpec* job) {
  tessera::v1::DataSpec* d = job->mutable_data();
  MapPath(d->mutable_train_images());
  MapPath(d->mutable_train_labels());
  MapPath(d->mutable_test_images());
  MapPath(d->mutable_test_labels());
  MapPath(d->mutable_train_path());
  MapPath(d->mutable_test_path());
}

void CheckValidJob(const tessera::v1::JobSpec& job) {
  Check(!job.model().empty(), "validated job has no model");
  Check(job.loss() != tessera::v1::LOSS_UNSPECIFIED, "validated job has no loss");
  const LossKind loss = job.loss() == tessera::v1::SOFTMAX_CROSS_ENTROPY
                            ? LossKind::kSoftmaxCrossEntropy
                            : LossKind::kMeanSquaredError;
  Check(ParseModelSpec(job.model(), loss).ok(), "validated job's model does not parse");
  Check(job.batch_size() > 0 && job.epochs() > 0, "validated batch_size or epochs <= 0");
  Check(job.num_shards() >= 1 && job.num_shards() <= 1024, "validated num_shards out of range");
  Check(job.num_workers() >= 1 && job.num_workers() <= 65536,
        "validated num_workers out of range");
  Check(job.block_bytes() >= 4 && job.block_bytes() <= (64 << 20),
        "validated block_bytes out of range");
  Check(job.consistency().mode() != tessera::v1::CONSISTENCY_MODE_UNSPECIFIED,
        "validated job has no mode");
  Check(job.consistency().staleness() >= 0, "validated staleness < 0");
  Check(job.consistency().barrier_timeout_ms() > 0, "validated barrier timeout <= 0");
  Check(job.optimizer().type() != tessera::v1::OPTIMIZER_TYPE_UNSPECIFIED,
        "validated job has no optimizer");
  Check(job.optimizer().learning_rate() > 0 && std::isfinite(job.optimizer().learning_rate()),
        "validated learning rate not positive and finite");
  Check(job.max_steps() >= 0 && job.checkpoint().every_steps() >= 0 &&
            job.checkpoint().keep() >= 0,
        "validated counts negative");

  // Validation fills defaults once; a second pass changes nothing.
  tessera::v1::JobSpec again = job;
  const absl::Status s = ValidateJobSpec(&again);
  Check(s.ok(), absl::StrCat("validated job fails validation again: ", s.ToString()));
  Check(JobHash(again) == JobHash(job), "second validation changed the job");

  // Every process hashes its own parse of the same file: a job printed and
  // parsed again must hash alike.
  std::string text;
  Check(google::protobuf::TextFormat::PrintToString(job, &text), "cannot print the job");
  absl::StatusOr<tessera::v1::JobSpec> reparsed = ParseJobSpec(text, kSource);
  Check(reparsed.ok(), absl::StrCat("printed job does not parse: ",
                                    reparsed.status().ToString(), "\n", text));
  Check(JobHash(*reparsed) == JobHash(job), "text round trip changed the job hash");
}

}  // namespace
}  // namespace tessera::fuzz

// Text format accepts any bytes in a string field ("\377"); hashing such a
// job makes protobuf log an invalid-UTF-8 error per input. Keep the fuzzer's
// output readable (fatal errors still abort).
extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace tessera::fuzz;
  const absl::string_view text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<tessera::v1::JobSpec> job = tessera::ParseJobSpec(text, kSource);
  if (!job.ok()) {
    Check(job.status().code() == absl::StatusCode::kInvalidArgument,
          absl::StrCat("parse error with an unexpected code: ", job.status().ToString()));
    Check(absl::StartsWith(job.status().message(), absl::StrCat(kSource, ":")),
          absl::StrCat("parse error does not name the source: ", job.status().ToString()));
    return 0;
  }
  MapPaths(&*job);
  const absl::Status valid = tessera::ValidateJobSpec(&*job);
  if (!valid.ok()) {
    Check(valid.code() == absl::StatusCode::kInvalidArgument,
          absl::StrCat("validation error with an unexpected code: ", valid.ToString()));
    Check(absl::StartsWith(valid.message(), "job."),
          absl::StrCat("validation error does not name a field: ", valid.ToString()));
    return 0;
  }
  CheckValidJob(*job);
  return 0;
}
