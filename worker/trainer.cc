#include "worker/trainer.h"

#include <algorithm>
#include <cstdio>
#include <optional>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/aligned_buffer.h"
#include "common/job_spec.h"
#include "common/status_macros.h"
#include "worker/event_writer.h"

namespace tessera {
namespace {

void DrawProgress(std::ostream& out, int64_t done, int64_t total, double loss) {
  constexpr int kWidth = 30;
  const int filled = total > 0 ? static_cast<int>(kWidth * done / total) : kWidth;
  std::string bar(kWidth, '.');
  std::fill(bar.begin(), bar.begin() + filled, '=');
  if (filled < kWidth) bar[filled] = '>';
  out << absl::StrFormat("\r%6d/%d [%s] - loss: %.4f", done, total, bar, loss)
      << std::flush;
}

// The epoch's figures for TensorBoard at global step `step`. The learning
// rate is the job's base rate: the schedule is applied on the servers, and
// the worker library does not depend on the server's optimizer code.
absl::Status WriteEpochScalars(EventWriter* events, int64_t step, const EpochStats& s,
                               bool evaluated, bool classification,
                               const tessera::v1::JobSpec& job) {
  TESSERA_RETURN_IF_ERROR(events->AddScalar("epoch/loss", step, s.train_loss));
  if (evaluated) {
    TESSERA_RETURN_IF_ERROR(events->AddScalar("epoch/val_loss", step, s.val_loss));
    if (classification) {
      TESSERA_RETURN_IF_ERROR(events->AddScalar("epoch/val_accuracy", step, s.val_accuracy));
    }
  }
  TESSERA_RETURN_IF_ERROR(events->AddScalar("epoch/samples_per_sec", step, s.samples_per_sec));
  TESSERA_RETURN_IF_ERROR(
      events->AddScalar("epoch/learning_rate", step, job.optimizer().learning_rate()));
  // Once per epoch, so that a running TensorBoard shows the curves live
  // without a system call per step.
  return events->Flush();
}

// Runs one PushAndPull at a time on a thread of its own, so the next
// gradient can be computed while the previous step's push and pull travel
// (JobSpec.overlap). Start() and Wait() alternate, from one thread.
class BackgroundExchange {
 public:
  explicit BackgroundExchange(ParameterClient* client)
      : client_(client), thread_([this] { Loop(); }) {}

  ~BackgroundExchange() {
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
    }
    thread_.join();  // after the exchange in flight, if any
  }

  // Starts PushAndPull(step, grads, params); both spans must stay untouched
  // until Wait() returns.
  void Start(int64_t step, absl::Span<const float> grads, absl::Span<float> params) {
    absl::MutexLock lock(&mu_);
    job_ = Job{step, grads, params};
    result_.reset();
  }

  bool busy() const {
    absl::MutexLock lock(&mu_);
    return job_.has_value() || result_.has_value();
  }

  // Waits for the exchange Start() began and returns its outcome.
  absl::StatusOr<ParameterClient::PushPullResult> Wait() {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](std::optional<absl::StatusOr<ParameterClient::PushPullResult>>* r) {
          return r->has_value();
        },
        &result_));
    absl::StatusOr<ParameterClient::PushPullResult> out = *std::move(result_);
    result_.reset();
    return out;
  }

 private:
  struct Job {
    int64_t step;
    absl::Span<const float> grads;
    absl::Span<float> params;
  };

  void Loop() {
    while (true) {
      Job job;
      {
        absl::MutexLock lock(&mu_);
        auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return stop_ || job_.has_value();
        };
        mu_.Await(absl::Condition(&ready));
        if (!job_.has_value()) return;  // stopping, nothing in flight
        job = *job_;
      }
      absl::StatusOr<ParameterClient::PushPullResult> r =
          client_->PushAndPull(job.step, job.grads, job.params);
      absl::MutexLock lock(&mu_);
      job_.reset();
      result_ = std::move(r);
    }
  }

  ParameterClient* const client_;
  mutable absl::Mutex mu_;
  std::optional<Job> job_ ABSL_GUARDED_BY(mu_);
  std::optional<absl::StatusOr<ParameterClient::PushPullResult>> result_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;  // last: starts after the fields above exist
};

// Adds a push's acknowledgements without effect to the summary.
void CountAcks(const ParameterClient::PushPullResult& r, TrainSummary* summary) {
  summary->duplicate_acks += r.not_applied - r.late;
  summary->late_acks += r.late;
}

}  // namespace

int64_t EvalChunkRows(const tessera::v1::JobSpec& job) {
  return std::max<int64_t>(job.batch_size(), 512);
}

absl::StatusOr<int64_t> StepsPerEpoch(const tessera::v1::JobSpec& job,
                                      int64_t train_rows) {
  const int64_t per_step =
      static_cast<int64_t>(job.num_workers()) * job.batch_size();
  const int64_t steps = train_rows / per_step;
  if (steps < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "job.batch_size: ", job.num_workers(), " workers x batch ",
        job.batch_size(), " = ", per_step, " samples per step, but the training set has only ",
        train_rows));
  }
  return steps;
}

void WorkerBatchRows(const std::vector<int64_t>& permutation,
                     int64_t step_in_epoch, int rank, int num_workers,
                     int batch_size, std::vector<int64_t>* rows) {
  rows->resize(batch_size);
  const int64_t base = step_in_epoch * batch_size;
  for (int j = 0; j < batch_size; ++j) {
    (*rows)[j] = permutation[(base + j) * num_workers + rank];
  }
}

absl::StatusOr<EvalResult> EvaluateDataset(GradientBackend* backend,
                                           absl::Span<const float> params,
                                           const Dataset& data, int64_t chunk) {
  EvalResult total;
  for (int64_t begin = 0; begin < data.rows; begin += chunk) {
    const int64_t count = std::min(chunk, data.rows - begin);
    TESSERA_ASSIGN_OR_RETURN(
        EvalResult r, backend->Evaluate(params, BatchBuffer::View(data, begin, count)));
    total.loss_sum += r.loss_sum;
    total.correct += r.correct;
    total.count += r.count;
  }
  return total;
}

std::string FormatEpochLine(int epoch, int epochs, const EpochStats& s,
                            bool classification) {
  std::string line = absl::StrFormat("epoch %d/%d - %.1fs - loss: %.4f - val_loss: %.4f",
                                     epoch, epochs, s.seconds, s.train_loss, s.val_loss);
  if (classification) absl::StrAppendFormat(&line, " - val_accuracy: %.4f", s.val_accuracy);
  absl::StrAppendFormat(&line, " - %.0f samples/s", s.samples_per_sec);
  return line;
}

std::string SummaryJson(const TrainSummary& s, const tessera::v1::JobSpec& job) {
  std::vector<std::string> val_losses;
  for (const EpochStats& e : s.epochs) val_losses.push_back(absl::StrFormat("%.6g", e.val_loss));
  std::string json = "{";
  if (s.classification) absl::StrAppendFormat(&json, "\"test_accuracy\": %.6g, ", s.test_accuracy);
  absl::StrAppendFormat(&json,
                        "\"test_loss\": %.6g, \"val_loss\": [%s], \"epochs\": %d, "
                        "\"steps\": %d, \"samples_per_sec\": %.6g, \"wall_seconds\": %.6g, "
                        "\"mode\": \"%s\", \"workers\": %d, \"shards\": %d, "
                        "\"batch_size\": %d, \"duplicate_acks\": %d, \"late_acks\": %d, "
                        "\"payload_bytes_per_step\": %.0f, \"wire_dtype\": \"%s\", "
                        "\"top_k_fraction\": %.6g, \"overlap\": %s, \"skipped_steps\": %d, "
                        "\"first_step\": %d, \"early_shard_pushes\": %d}\n",
                        s.test_loss, absl::StrJoin(val_losses, ", "),
                        static_cast<int>(s.epochs.size()), s.steps, s.samples_per_sec,
                        s.wall_seconds, ModeName(job.consistency().mode()),
                        job.num_workers(), job.num_shards(), job.batch_size(),
                        s.duplicate_acks, s.late_acks, s.payload_bytes_per_step,
                        tessera::v1::DType_Name(job.wire_dtype()), job.top_k_fraction(),
                        job.overlap() && job.consistency().mode() != tessera::v1::SYNC
                            ? "true"
                            : "false",
                        s.skipped_steps, s.first_step, s.early_shard_pushes);
  return json;
}

absl::StatusOr<TrainSummary> Train(const tessera::v1::JobSpec& job,
                                   const ModelSpec& model, const Dataset& train,
                                   const Dataset& test, GradientBackend* backend,
                                   ParameterClient* client,
                                   const TrainerOptions& options) {
  const int workers = job.num_workers();
  // Workers whose gradients a step applies: with backup workers a
  // synchronous step takes the first num_workers - backup_workers, so
  // samples/s counts only those samples.
  const int applied_workers = workers - job.consistency().backup_workers();
  const int batch = job.batch_size();
  TESSERA_ASSIGN_OR_RETURN(const int64_t steps_per_epoch,
                           StepsPerEpoch(job, train.rows));
  int64_t total_steps = steps_per_epoch * job.epochs();
  if (job.max_steps() > 0) total_steps = std::min(total_steps, job.max_steps());
  const int64_t eval_chunk = EvalChunkRows(job);

  TrainSummary summary;
  summary.classification = model.loss == LossKind::kSoftmaxCrossEntropy;
  // Aligned: see AlignedAllocator on repeatable rounding.
  AlignedVector<float> params(model.total_params());
  AlignedVector<float> grads(model.total_params());
  absl::StatusOr<int64_t> initial = client->Pull(0, absl::MakeSpan(params));
  if (!initial.ok()) return Annotate(initial.status(), "initial pull");
  const int64_t version = *initial;
  // A synchronous worker that (re)joins a running job starts at the step
  // the servers are at; an asynchronous one (whose versions count pushes,
  // not steps) at the step its earlier incarnation had reached.
  const int64_t first_step =
      job.consistency().mode() == tessera::v1::SYNC
          ? std::min(version, total_steps)
          : std::clamp<int64_t>(client->resume_step(), 0, total_steps);
  summary.first_step = first_step;

  const absl::Time run_start = absl::Now();
  std::vector<int64_t> permutation;
  std::vector<int64_t> rows;
  BatchBuffer buffer;
  absl::Time epoch_start;
  absl::Time last_draw = absl::InfinitePast();
  double loss_sum = 0;
  int64_t loss_count = 0;
  int64_t samples_seen = 0;
  int permutation_epoch = -1;
  const bool sync = job.consistency().mode() == tessera::v1::SYNC;
  // Overlap (ASYNC/SSP with job.overlap): step s's gradient is computed from
  // the parameters step s - 2's exchange returned while step s - 1's push
  // and pull are in flight, one step more staleness for hiding the
  // exchange. The two parameter and gradient buffers alternate: compute
  // reads one pair while the exchange writes the other.
  const bool overlap = job.overlap() && !sync;
  // Layer-wise pushes (TrainerOptions.layerwise_push) only without overlap.
  const bool layerwise = options.layerwise_push && !overlap;
  AlignedVector<float> params_b, grads_b;
  std::optional<BackgroundExchange> exchange;
  absl::Span<float> cur_params = absl::MakeSpan(params), cur_grads = absl::MakeSpan(grads);
  absl::Span<float> other_params, other_grads;
  if (overlap) {
    params_b = params;
    grads_b.resize(grads.size());
    other_params = absl::MakeSpan(params_b);
    other_grads = absl::MakeSpan(grads_b);
    exchange.emplace(client);
  }
  // Waits for the exchange in flight and leaves its (freshest) parameters
  // in both buffers.
  auto drain = [&]() -> absl::Status {
    if (!exchange.has_value() || !exchange->busy()) return absl::OkStatus();
    TESSERA_ASSIGN_OR_RETURN(const ParameterClient::PushPullResult r, exchange->Wait());
    CountAcks(r, &summary);
    std::copy(other_params.begin(), other_params.end(), cur_params.begin());
    return absl::OkStatus();
  };
  for (int64_t step = first_step; step < total_steps; ++step) {
    const int epoch = static_cast<int>(step / steps_per_epoch);
    const int64_t in_epoch = step % steps_per_epoch;
    if (epoch != permutation_epoch) {
      permutation = EpochPermutation(train.rows, job.seed(), epoch);
      permutation_epoch = epoch;
      epoch_start = absl::Now();
      loss_sum = 0;
      loss_count = 0;
    }
    WorkerBatchRows(permutation, in_epoch, options.rank, workers, batch, &rows);
    const Batch b = buffer.Gather(train, rows);
    ParameterClient::PushPullResult exchanged;
    float loss = 0;
    if (layerwise) {
      // Gradients leave as backward finishes them (per parameter on the
      // stream, per shard through shared memory); each shard's pulled
      // parameters are written once all of its gradients have left.
      TESSERA_RETURN_IF_ERROR(client->StartPushAndPull(step, cur_grads, cur_params));
      absl::StatusOr<float> computed = backend->ComputeGradientsReporting(
          cur_params, b, cur_grads, [client](int p) { client->MarkParamReady(p); });
      if (!computed.ok()) {
        client->AbortPushAndPull();
        return computed.status();
      }
      loss = *computed;
      TESSERA_ASSIGN_OR_RETURN(exchanged, client->FinishPushAndPull());
      CountAcks(exchanged, &summary);
    } else if (overlap) {
      TESSERA_ASSIGN_OR_RETURN(loss, backend->ComputeGradients(cur_params, b, cur_grads));
      if (exchange->busy()) {
        TESSERA_ASSIGN_OR_RETURN(exchanged, exchange->Wait());
        CountAcks(exchanged, &summary);
      }
      // The exchange writes the buffer this step's compute just read; the
      // next compute reads the one the previous exchange filled.
      exchange->Start(step, cur_grads, cur_params);
      std::swap(cur_params, other_params);
      std::swap(cur_grads, other_grads);
    } else {
      TESSERA_ASSIGN_OR_RETURN(loss, backend->ComputeGradients(cur_params, b, cur_grads));
      TESSERA_ASSIGN_OR_RETURN(exchanged, client->PushAndPull(step, cur_grads, cur_params));
      CountAcks(exchanged, &summary);
    }
    ++summary.steps;
    samples_seen += static_cast<int64_t>(batch) * applied_workers;
    loss_sum += loss;
    ++loss_count;
    const double mean_loss = loss_sum / loss_count;
    if (options.on_step) options.on_step(step, epoch, mean_loss);
    if (options.events != nullptr) {
      TESSERA_RETURN_IF_ERROR(options.events->AddScalar("train/loss", step + 1, loss));
    }

    // A synchronous worker that was cut off while the others went on gets
    // parameters several steps ahead: it continues from there instead of
    // replaying steps that are already closed (and holding everyone up).
    const int64_t next = exchanged.version;
    const bool skipping = sync && next > step + 1;
    const bool epoch_end = in_epoch == steps_per_epoch - 1 || step == total_steps - 1 ||
                           (skipping && next / steps_per_epoch != epoch);
    if (options.progress_bar && options.out != nullptr && !epoch_end &&
        absl::Now() - last_draw > absl::Milliseconds(100)) {
      DrawProgress(*options.out, in_epoch + 1, steps_per_epoch, mean_loss);
      last_draw = absl::Now();
    }
    if (skipping) {
      summary.skipped_steps += next - (step + 1);
      step = std::min(next, total_steps) - 1;  // the loop's ++step lands on `next`
    }
    if (!epoch_end) continue;
    TESSERA_RETURN_IF_ERROR(drain());

    EpochStats stats;
    stats.seconds = absl::ToDoubleSeconds(absl::Now() - epoch_start);
    stats.train_loss = mean_loss;
    stats.samples_per_sec = stats.seconds > 0 ? loss_count * static_cast<double>(batch) *
                                                    applied_workers / stats.seconds
                                              : 0;
    if (options.evaluate) {
      TESSERA_ASSIGN_OR_RETURN(EvalResult r,
                               EvaluateDataset(backend, cur_params, test, eval_chunk));
      stats.val_loss = r.loss_sum / std::max<int64_t>(1, r.count);
      stats.val_accuracy = static_cast<double>(r.correct) / std::max<int64_t>(1, r.count);
    }
    summary.epochs.push_back(stats);
    if (options.events != nullptr) {
      TESSERA_RETURN_IF_ERROR(WriteEpochScalars(options.events, step + 1, stats,
                                                options.evaluate, summary.classification, job));
    }
    if (options.out != nullptr && options.evaluate) {
      if (options.progress_bar) *options.out << "\r\033[K";
      *options.out << FormatEpochLine(epoch + 1, job.epochs(), stats,
                                      summary.classification)
                   << std::endl;
    }
  }
  summary.wall_seconds = absl::ToDoubleSeconds(absl::Now() - run_start);
  if (summary.steps > 0) {
    summary.payload_bytes_per_step =
        static_cast<double>(client->payload_bytes()) / static_cast<double>(summary.steps);
  }
  summary.early_shard_pushes = client->early_pushes();
  summary.samples_per_sec =
      summary.wall_seconds > 0 ? samples_seen / summary.wall_seconds : 0;
  if (!summary.epochs.empty()) {
    summary.test_loss = summary.epochs.back().val_loss;
    summary.test_accuracy = summary.epochs.back().val_accuracy;
  }
  TESSERA_RETURN_IF_ERROR(drain());  // an error return above leaves it to ~BackgroundExchange
  summary.final_params.assign(cur_params.begin(), cur_params.end());
  return summary;
}

}  // namespace tessera
