#include "worker/worker_metrics.h"

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace tessera {

WorkerMetrics::WorkerMetrics(prometheus::Registry& registry, int rank, int batch_size)
    : batch_size_(batch_size),
      steps_(prometheus::BuildCounter()
                 .Name("tessera_worker_steps_total")
                 .Help("Training steps this worker completed (compute, push and pull).")
                 .Register(registry)
                 .Add({{"worker", absl::StrCat(rank)}})),
      samples_(prometheus::BuildCounter()
                   .Name("tessera_worker_samples_total")
                   .Help("Training samples this worker processed.")
                   .Register(registry)
                   .Add({{"worker", absl::StrCat(rank)}})),
      step_seconds_(prometheus::BuildHistogram()
                        .Name("tessera_worker_step_seconds")
                        .Help("Wall time of one training step, pull to pull.")
                        .Register(registry)
                        .Add({{"worker", absl::StrCat(rank)}},
                             prometheus::Histogram::BucketBoundaries{
                                 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2,
                                 0.5, 1, 2, 5})),
      loss_(prometheus::BuildGauge()
                .Name("tessera_worker_train_loss")
                .Help("Mean training loss of the epoch in progress.")
                .Register(registry)
                .Add({{"worker", absl::StrCat(rank)}})),
      epoch_(prometheus::BuildGauge()
                 .Name("tessera_worker_epoch")
                 .Help("Epoch in progress (0-based).")
                 .Register(registry)
                 .Add({{"worker", absl::StrCat(rank)}})),
      step_gauge_(prometheus::BuildGauge()
                      .Name("tessera_worker_step")
                      .Help("Global step this worker has completed.")
                      .Register(registry)
                      .Add({{"worker", absl::StrCat(rank)}})) {}

void WorkerMetrics::Step(int64_t step, int epoch, double loss) {
  const absl::Time now = absl::Now();
  if (last_ != absl::InfinitePast()) step_seconds_.Observe(absl::ToDoubleSeconds(now - last_));
  last_ = now;
  steps_.Increment();
  samples_.Increment(batch_size_);
  loss_.Set(loss);
  epoch_.Set(epoch);
  step_gauge_.Set(static_cast<double>(step + 1));
}

}  // namespace tessera
