#include "worker/job_data.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace tessera {
namespace {

absl::Status CheckAgainstModel(const Dataset& d, const ModelSpec& model,
                               absl::string_view what) {
  if (d.rows == 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": no samples"));
  }
  if (d.dim != model.input_dim()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has ", d.dim, " features but job.model takes ",
                     model.input_dim(), " inputs"));
  }
  if (model.loss == LossKind::kSoftmaxCrossEntropy) {
    if (d.labels.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": no class labels"));
    }
    if (d.num_classes > model.output_dim()) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " has labels up to ", d.num_classes - 1,
                       " but job.model has ", model.output_dim(), " outputs"));
    }
  } else if (d.target_dim != model.output_dim()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has ", d.target_dim, " targets per sample but job.model has ",
                     model.output_dim(), " outputs"));
  }
  return absl::OkStatus();
}

int64_t Holdout(int64_t rows, double fraction) {
  return std::max<int64_t>(1, static_cast<int64_t>(std::llround(rows * fraction)));
}

}  // namespace

LossKind JobLoss(const tessera::v1::JobSpec& job) {
  return job.loss() == tessera::v1::SOFTMAX_CROSS_ENTROPY
             ? LossKind::kSoftmaxCrossEntropy
             : LossKind::kMeanSquaredError;
}

absl::StatusOr<JobData> LoadJobData(const tessera::v1::JobSpec& job,
                                    const ModelSpec& model) {
  const tessera::v1::DataSpec& d = job.data();
  const bool classification = model.loss == LossKind::kSoftmaxCrossEntropy;
  JobData out;
  switch (d.format()) {
    case tessera::v1::IDX: {
      TESSERA_ASSIGN_OR_RETURN(out.train, ReadIdx(d.train_images(), d.train_labels()));
      TESSERA_ASSIGN_OR_RETURN(out.test, ReadIdx(d.test_images(), d.test_labels()));
      break;
    }
    case tessera::v1::CSV:
    case tessera::v1::LIBSVM: {
      auto read = [&](const std::string& path) -> absl::StatusOr<Dataset> {
        if (d.format() == tessera::v1::CSV) {
          return ReadCsv(path, d.label_column(), d.has_header(), classification);
        }
        return ReadLibsvm(path, d.num_features() > 0 ? d.num_features()
                                                     : model.input_dim(),
                          classification);
      };
      TESSERA_ASSIGN_OR_RETURN(Dataset train, read(d.train_path()));
      if (d.test_path().empty()) {
        const int64_t holdout = Holdout(train.rows, d.validation_fraction());
        if (holdout >= train.rows) {
          return absl::InvalidArgumentError(absl::StrCat(
              "job.data.validation_fraction leaves no training samples in ",
              d.train_path()));
        }
        std::tie(out.train, out.test) = SplitTail(std::move(train), holdout);
      } else {
        out.train = std::move(train);
        TESSERA_ASSIGN_OR_RETURN(out.test, read(d.test_path()));
      }
      break;
    }
    case tessera::v1::SYNTHETIC_REGRESSION: {
      Dataset all = MakeSyntheticRegression(d.num_samples(), model.input_dim(), job.seed());
      std::tie(out.train, out.test) =
          SplitTail(std::move(all), Holdout(d.num_samples(), d.validation_fraction()));
      break;
    }
    default:
      return absl::InvalidArgumentError("job.data.format: unsupported");
  }
  TESSERA_RETURN_IF_ERROR(CheckAgainstModel(out.train, model, "training data"));
  TESSERA_RETURN_IF_ERROR(CheckAgainstModel(out.test, model, "held-out data"));
  return out;
}

}  // namespace tessera
