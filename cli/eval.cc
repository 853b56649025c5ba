#include "cli/eval.h"

#include <sys/stat.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/aligned_buffer.h"
#include "common/model_spec.h"
#include "common/status_macros.h"
#include "server/checkpoint.h"
#include "server/optimizer.h"
#include "worker/cpu_backend.h"
#include "worker/job_data.h"
#include "worker/trainer.h"

namespace tessera {
namespace {

bool IsDirectory(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      absl::StrAppendFormat(&out, "\\u%04x", c);
    } else {
      out += c;
    }
  }
  return out + "\"";
}

}  // namespace

absl::StatusOr<CheckpointEvaluation> EvaluateCheckpoint(const tessera::v1::JobSpec& job,
                                                        const std::string& dir) {
  if (!IsDirectory(dir)) {
    return absl::NotFoundError(absl::StrCat("checkpoint folder '", dir, "' does not exist"));
  }
  TESSERA_ASSIGN_OR_RETURN(ModelSpec model, ParseModelSpec(job.model(), JobLoss(job)));
  // The checkpoint records the optimizer's slots beside the parameters;
  // their count is part of what makes a checkpoint complete.
  TESSERA_ASSIGN_OR_RETURN(std::unique_ptr<Optimizer> optimizer,
                           Optimizer::Create(job.optimizer()));
  CheckpointInfo expected;
  expected.job_name = job.name();
  expected.model = job.model();
  expected.optimizer_type = tessera::v1::OptimizerType_Name(job.optimizer().type());
  expected.num_shards = job.num_shards();
  std::vector<std::string> skipped;
  TESSERA_ASSIGN_OR_RETURN(
      std::optional<RestoredModel> restored,
      LoadLatestCheckpoint(dir, expected, model, optimizer->num_slots(), &skipped));
  if (!restored.has_value()) {
    std::string message = absl::StrCat("no complete checkpoint in '", dir, "'");
    if (!skipped.empty()) {
      absl::StrAppend(&message, " (", skipped.size(),
                      " incomplete or corrupt; newest: ", skipped.front(), ")");
    }
    return absl::NotFoundError(message);
  }

  TESSERA_ASSIGN_OR_RETURN(JobData data, LoadJobData(job, model));
  // The chunk size and the aligned copy match the trainer's epoch-end
  // evaluation: Eigen's reductions round differently with other chunking
  // or alignment, and the figures should equal what the run printed.
  const int64_t chunk = EvalChunkRows(job);
  TESSERA_ASSIGN_OR_RETURN(std::unique_ptr<GradientBackend> backend,
                           CreateCpuBackend(model, chunk));
  AlignedVector<float> params(restored->params.begin(), restored->params.end());
  TESSERA_ASSIGN_OR_RETURN(EvalResult r, EvaluateDataset(backend.get(), params, data.test, chunk));

  CheckpointEvaluation e;
  e.checkpoint = restored->path;
  e.step = restored->step;
  e.samples = r.count;
  e.classification = model.loss == LossKind::kSoftmaxCrossEntropy;
  e.test_loss = r.loss_sum / std::max<int64_t>(1, r.count);
  e.test_accuracy = static_cast<double>(r.correct) / std::max<int64_t>(1, r.count);
  return e;
}

std::string FormatEvaluation(const CheckpointEvaluation& e) {
  std::string line = absl::StrFormat("checkpoint %s: test_loss: %.4f", e.checkpoint, e.test_loss);
  if (e.classification) absl::StrAppendFormat(&line, " - test_accuracy: %.4f", e.test_accuracy);
  return line;
}

std::string EvaluationJson(const CheckpointEvaluation& e) {
  std::string json = absl::StrFormat("{\"checkpoint\": %s, \"step\": %d, \"samples\": %d, ",
                                     JsonString(e.checkpoint), e.step, e.samples);
  if (e.classification) absl::StrAppendFormat(&json, "\"test_accuracy\": %.9g, ", e.test_accuracy);
  absl::StrAppendFormat(&json, "\"test_loss\": %.9g}\n", e.test_loss);
  return json;
}

}  // namespace tessera
