// The worker's training loop: pull, compute, push, with per-epoch
// evaluation and a Keras-style progress line. Transport-free: it talks to a
// ParameterClient and a GradientBackend.

#ifndef TESSERA_WORKER_TRAINER_H_
#define TESSERA_WORKER_TRAINER_H_

#include <cstdint>
#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_spec.h"
#include "proto/tessera.pb.h"
#include "worker/dataset.h"
#include "worker/gradient_backend.h"
#include "worker/parameter_client.h"

namespace tessera {

class EventWriter;

struct TrainerOptions {
  int rank = 0;
  // Whether this worker evaluates after each epoch and prints the epoch
  // lines (by default only rank 0 does).
  bool evaluate = true;
  // Stream for the epoch lines (stdout in the binary); null for silence.
  std::ostream* out = nullptr;
  // Redraw a progress bar on `out` while an epoch runs (terminals only).
  bool progress_bar = false;
  // Called after every step with (global step, epoch, mean loss so far);
  // for heartbeats. May be empty.
  std::function<void(int64_t, int, double)> on_step;
  // TensorBoard scalars, or null for none; not owned. Every step writes
  // `train/loss` (this worker's batch loss); every epoch end writes
  // `epoch/loss`, `epoch/val_loss`, `epoch/val_accuracy` (classification),
  // `epoch/samples_per_sec` and `epoch/learning_rate`, then flushes. Steps
  // are global steps completed. Only rank 0 should get one: one log folder,
  // one set of curves.
  EventWriter* events = nullptr;
  // Push each shard as soon as backward has finished with every parameter
  // it holds (GradientBackend::ComputeGradientsReporting and the split
  // ParameterClient calls) instead of after the whole backward. Same bytes,
  // same results. Not used with JobSpec.overlap.
  bool layerwise_push = false;
};

struct EpochStats {
  double seconds = 0;
  double train_loss = 0;
  double val_loss = 0;
  double val_accuracy = 0;  // classification only
  // All workers together; with backup workers, the samples whose gradients
  // the steps applied.
  double samples_per_sec = 0;
};

struct TrainSummary {
  std::vector<EpochStats> epochs;
  int64_t steps = 0;
  // Shard pushes acknowledged without effect: repeats of a push already
  // taken, and (late_acks) pushes for a step that closed without them.
  int64_t duplicate_acks = 0;
  int64_t late_acks = 0;
  double payload_bytes_per_step = 0;  // tensor bytes pushed + pulled per step
  // Shard pushes that left before backward ended (TrainerOptions.layerwise_push).
  int64_t early_shard_pushes = 0;
  int64_t skipped_steps = 0;  // SYNC: steps the others finished while we were cut off
  int64_t first_step = 0;     // where this run began (a rejoining worker's resume point)
  double wall_seconds = 0;
  double samples_per_sec = 0;  // all workers, whole run (as above)
  double test_loss = 0;
  double test_accuracy = 0;
  bool classification = false;
  std::vector<float> final_params;
};

// Steps per epoch: every worker takes the same number of full batches, so
// synchronous barriers line up; the remainder of each epoch's permutation
// is dropped. kInvalidArgument when not even one step fits.
absl::StatusOr<int64_t> StepsPerEpoch(const tessera::v1::JobSpec& job,
                                      int64_t train_rows);

// Indices of the rows worker `rank` trains on at step `step_in_epoch`,
// given the epoch's permutation: the rank-th of every num_workers
// consecutive positions of the global batch, so that W workers with batch
// b see exactly the samples one worker with batch W*b would.
void WorkerBatchRows(const std::vector<int64_t>& permutation, int64_t step_in_epoch,
                     int rank, int num_workers, int batch_size,
                     std::vector<int64_t>* rows);

// Runs the job to the end (epochs or max_steps). Not thread-safe.
absl::StatusOr<TrainSummary> Train(const tessera::v1::JobSpec& job,
                                   const ModelSpec& model, const Dataset& train,
                                   const Dataset& test, GradientBackend* backend,
                                   ParameterClient* client,
                                   const TrainerOptions& options);

// Rows per chunk of the held-out evaluation after each epoch: the batch
// size, and at least 512. Size a backend with it to run both. Whatever
// evaluates a job's parameters uses the same chunks, because Eigen's
// reductions round differently with other chunking.
int64_t EvalChunkRows(const tessera::v1::JobSpec& job);

// Loss and accuracy of `params` on `data`, in chunks of at most `chunk` rows.
absl::StatusOr<EvalResult> EvaluateDataset(GradientBackend* backend,
                                           absl::Span<const float> params,
                                           const Dataset& data, int64_t chunk);

// Keras-style line: "epoch 3/10 - 4.2s - loss: 0.4312 - val_loss: 0.4520 -
// val_accuracy: 0.8411 - 14301 samples/s".
std::string FormatEpochLine(int epoch, int epochs, const EpochStats& s,
                            bool classification);

// The summary as JSON (test_accuracy, test_loss, val_loss per epoch,
// epochs, steps, samples_per_sec, wall_seconds, mode).
std::string SummaryJson(const TrainSummary& s, const tessera::v1::JobSpec& job);

}  // namespace tessera

#endif  // TESSERA_WORKER_TRAINER_H_
