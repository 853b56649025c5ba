// The metrics a server exports: request histograms recorded by the gRPC
// adapter, and a collector that reads the store's and the coordinator's
// state at scrape time.

#ifndef TESSERA_SERVER_SERVER_METRICS_H_
#define TESSERA_SERVER_SERVER_METRICS_H_

#include <memory>
#include <string>

#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "server/coordinator.h"
#include "server/shard_store.h"

namespace tessera {

// Instruments the ParameterService records into. Thread-safe (prometheus-cpp
// metrics are).
class ServiceMetrics {
 public:
  ServiceMetrics(prometheus::Registry& registry, int shard);

  // How a push ended (the `outcome` label of tessera_pushes_total).
  enum class Outcome { kApplied, kDuplicate, kLate, kRejected };
  // A push was handled in `seconds` with `bytes` of payload.
  void Push(Outcome outcome, double seconds, double bytes, int64_t staleness);
  // A pull (or the pull half of a push) waited `wait_seconds` for the
  // consistency rule and sent `bytes`.
  void Pull(double wait_seconds, double bytes);

 private:
  prometheus::Family<prometheus::Counter>& pushes_;
  prometheus::Counter& applied_;
  prometheus::Counter& duplicate_;
  prometheus::Counter& late_;
  prometheus::Counter& rejected_;
  prometheus::Counter& pulls_;
  prometheus::Counter& bytes_in_;
  prometheus::Counter& bytes_out_;
  prometheus::Histogram& push_seconds_;
  prometheus::Histogram& pull_wait_seconds_;
  prometheus::Histogram& staleness_;
};

// Shard and job state at scrape time: version, live workers, blocks and
// bytes owned, rejections by reason, and (where the coordinator runs) each
// worker's step and how far it trails the fastest.
std::shared_ptr<prometheus::Collectable> MakeStoreCollector(ShardStore* store,
                                                            Coordinator* coordinator);

}  // namespace tessera

#endif  // TESSERA_SERVER_SERVER_METRICS_H_
