// The metrics a worker exports on /metrics.

#ifndef TESSERA_WORKER_WORKER_METRICS_H_
#define TESSERA_WORKER_WORKER_METRICS_H_

#include <cstdint>

#include "absl/time/time.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace tessera {

// Step counters, step time, loss and epoch of one worker. Step() is called
// from the training thread only; scrapes read concurrently (prometheus-cpp
// metrics are thread-safe).
class WorkerMetrics {
 public:
  WorkerMetrics(prometheus::Registry& registry, int rank, int batch_size);

  // A step finished with the running mean loss of its epoch.
  void Step(int64_t step, int epoch, double loss);

 private:
  const int batch_size_;
  prometheus::Counter& steps_;
  prometheus::Counter& samples_;
  prometheus::Histogram& step_seconds_;
  prometheus::Gauge& loss_;
  prometheus::Gauge& epoch_;
  prometheus::Gauge& step_gauge_;
  absl::Time last_ = absl::InfinitePast();
};

}  // namespace tessera

#endif  // TESSERA_WORKER_WORKER_METRICS_H_
