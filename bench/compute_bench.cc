// Compute floor of the end-to-end benchmark: one worker's own work, with no
// servers and no exchange. For every step of the job it gathers the rank's
// batch from the epoch's permutation and runs forward and backward on the
// CPU backend, exactly as tessera-worker does; after each epoch it evaluates
// the held-out set when the worker would (rank 0 by default). Parameters
// stay at their initial values (no optimizer runs), which changes nothing
// in the cost: the matrix products are dense.
//
// bench/fmnist_vs_ddp.py starts one process per worker at once, so the
// processes share the machine's cores as Tessera's workers do; their
// combined samples/s is the most any exchange could let the workers reach
// with this backend on this machine.
//
// Output: one JSON document (stdout, or --out) with the rank's steps,
// seconds and samples/s; seconds counts from the first step to the end of
// the last evaluation, as the worker's summary does.
//
// Usage: compute_bench --job=FILE [--rank=0] [--epochs=N] [--out=FILE]

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/aligned_buffer.h"
#include "common/job_spec.h"
#include "common/model_spec.h"
#include "common/status_macros.h"
#include "worker/cpu_backend.h"
#include "worker/dataset.h"
#include "worker/job_data.h"
#include "worker/trainer.h"

ABSL_FLAG(std::string, job, "", "Job file (text-format JobSpec).");
ABSL_FLAG(int32_t, rank, 0, "Worker rank whose share of each batch to compute.");
ABSL_FLAG(int32_t, epochs, 0, "Epochs to run (0: the job's).");
ABSL_FLAG(std::optional<bool>, evaluate, std::nullopt,
          "Evaluate the held-out set after each epoch (default: rank 0 only, "
          "as tessera-worker does).");
ABSL_FLAG(std::string, out, "", "Write the JSON document here (default: stdout).");

namespace tessera {
namespace {

absl::Status Run() {
  const std::string job_path = absl::GetFlag(FLAGS_job);
  if (job_path.empty()) return absl::InvalidArgumentError("--job: required");
  JobOverrides overrides;
  if (absl::GetFlag(FLAGS_epochs) != 0) overrides.epochs = absl::GetFlag(FLAGS_epochs);
  TESSERA_ASSIGN_OR_RETURN(const tessera::v1::JobSpec job, LoadJob(job_path, overrides));
  const int rank = absl::GetFlag(FLAGS_rank);
  const int workers = job.num_workers();
  if (rank < 0 || rank >= workers) {
    return absl::InvalidArgumentError(
        absl::StrCat("--rank: ", rank, " is outside [0, ", workers, ")"));
  }
  const bool evaluate = absl::GetFlag(FLAGS_evaluate).value_or(rank == 0);
  TESSERA_ASSIGN_OR_RETURN(const ModelSpec model, ParseModelSpec(job.model(), JobLoss(job)));
  TESSERA_ASSIGN_OR_RETURN(const JobData data, LoadJobData(job, model));
  const int batch = job.batch_size();
  // Sized as tessera-worker sizes it, for training batches and evaluation.
  const int64_t eval_chunk = EvalChunkRows(job);
  TESSERA_ASSIGN_OR_RETURN(std::unique_ptr<GradientBackend> backend,
                           CreateCpuBackend(model, eval_chunk));
  TESSERA_ASSIGN_OR_RETURN(const int64_t steps_per_epoch, StepsPerEpoch(job, data.train.rows));
  int64_t total_steps = steps_per_epoch * job.epochs();
  if (job.max_steps() > 0) total_steps = std::min(total_steps, job.max_steps());

  // He-uniform weights and zero biases; values do not change the cost.
  AlignedVector<float> params(model.total_params(), 0.0f);
  AlignedVector<float> grads(model.total_params());
  std::mt19937 rng(static_cast<uint32_t>(job.seed()));
  const std::vector<int64_t> offsets = model.param_offsets();
  for (size_t p = 0; p < model.params.size(); ++p) {
    const std::vector<int64_t>& shape = model.params[p].shape;
    if (shape.size() != 2) continue;
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    const float limit = std::sqrt(6.0f / static_cast<float>(shape[1]));
    for (int64_t i = 0; i < shape[0] * shape[1]; ++i) {
      params[offsets[p] + i] = limit * u(rng);
    }
  }

  std::vector<int64_t> permutation;
  std::vector<int64_t> rows;
  BatchBuffer buffer;
  double loss_sum = 0;
  int64_t evaluated = 0;
  const absl::Time start = absl::Now();
  for (int64_t step = 0; step < total_steps; ++step) {
    const int64_t epoch = step / steps_per_epoch;
    const int64_t in_epoch = step % steps_per_epoch;
    if (in_epoch == 0) permutation = EpochPermutation(data.train.rows, job.seed(), epoch);
    WorkerBatchRows(permutation, in_epoch, rank, workers, batch, &rows);
    TESSERA_ASSIGN_OR_RETURN(
        const float loss,
        backend->ComputeGradients(params, buffer.Gather(data.train, rows), absl::MakeSpan(grads)));
    loss_sum += loss;
    const bool epoch_end = in_epoch == steps_per_epoch - 1 || step == total_steps - 1;
    if (evaluate && epoch_end) {
      TESSERA_ASSIGN_OR_RETURN(const EvalResult r,
                               EvaluateDataset(backend.get(), params, data.test, eval_chunk));
      evaluated += r.count;
    }
  }
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  const double samples = static_cast<double>(total_steps) * batch;
  // The loss is printed so that the work cannot be optimised away unseen.
  const std::string json = absl::StrFormat(
      "{\"benchmark\": \"compute\", \"rank\": %d, \"workers\": %d, \"batch_size\": %d, "
      "\"steps\": %d, \"evaluated_rows\": %d, \"seconds\": %.6g, "
      "\"samples_per_sec\": %.6g, \"mean_loss\": %.6g}\n",
      rank, workers, batch, total_steps, evaluated, seconds, seconds > 0 ? samples / seconds : 0.0,
      total_steps > 0 ? loss_sum / total_steps : 0.0);
  const std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty()) {
    std::cout << json;
    return absl::OkStatus();
  }
  std::ofstream f(out);
  f << json;
  f.close();
  if (!f) return absl::UnavailableError(absl::StrCat("--out: cannot write ", out));
  return absl::OkStatus();
}

}  // namespace
}  // namespace tessera

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "One worker's forward and backward passes over its share of a job's batches, "
      "with no servers. Prints JSON.\nUsage: compute_bench --job=FILE [--rank=0] "
      "[--epochs=N] [--out=FILE]");
  absl::ParseCommandLine(argc, argv);
  if (absl::Status s = tessera::Run(); !s.ok()) {
    std::cerr << "compute_bench: " << s << "\n";
    return 1;
  }
  return 0;
}
