#include "server/server_metrics.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/metrics.h"

namespace tessera {
namespace {

prometheus::Histogram::BucketBoundaries SecondsBuckets() {
  return {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
          0.05,   0.1,     0.25,   0.5,   1,      2.5,   5,    10};
}

class StoreCollector : public prometheus::Collectable {
 public:
  StoreCollector(ShardStore* store, Coordinator* coordinator)
      : store_(store), coordinator_(coordinator), shard_(absl::StrCat(store->shard())) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    const StoreStats s = store_->stats();
    std::vector<prometheus::MetricFamily> out;
    auto add = [&](prometheus::MetricFamily f, double v) {
      AddSample(&f, v, {{"shard", shard_}});
      out.push_back(std::move(f));
    };
    add(GaugeFamily("tessera_shard_version",
                    "Updates applied to this shard (the global step in sync mode)."),
        s.version);
    add(GaugeFamily("tessera_shard_live_workers", "Workers counted in this shard's barrier."),
        s.live_workers);
    add(GaugeFamily("tessera_shard_blocks", "Parameter blocks this shard owns."),
        store_->partition().shard_blocks(store_->shard()).size());
    add(GaugeFamily("tessera_shard_param_bytes", "Bytes of parameters this shard owns."),
        store_->partition().shard_bytes(store_->shard()));
    add(GaugeFamily("tessera_shard_apply_threads",
                    "Threads that share the per-block work of large pushes, steps and pulls "
                    "(--apply_threads)."),
        store_->apply_threads());
    add(CounterFamily("tessera_shard_apply_shared_total",
                      "Pushes, steps and pulls whose blocks the apply threads shared."),
        static_cast<double>(store_->shared_apply_runs()));
    auto rejected = CounterFamily("tessera_shard_rejected_updates_total",
                                  "Pushes rejected, by reason.");
    AddSample(&rejected, s.nonfinite_rejected, {{"shard", shard_}, {"reason", "nonfinite"}});
    AddSample(&rejected, s.requests_rejected - s.nonfinite_rejected,
              {{"shard", shard_}, {"reason", "invalid"}});
    out.push_back(std::move(rejected));
    if (coordinator_ != nullptr) {
      const tessera::v1::JobStatusResponse job = coordinator_->Status();
      int64_t fastest = 0;
      for (const auto& w : job.workers()) fastest = std::max(fastest, w.step());
      auto step = GaugeFamily("tessera_worker_step", "Last step each worker reported.");
      auto lag = GaugeFamily("tessera_worker_lag_steps",
                             "How many steps each worker trails the fastest one.");
      auto alive = GaugeFamily("tessera_worker_alive",
                               "1 when the worker sent a heartbeat recently.");
      for (const auto& w : job.workers()) {
        const std::string rank = absl::StrCat(w.worker_id());
        AddSample(&step, w.step(), {{"worker", rank}});
        AddSample(&lag, fastest - w.step(), {{"worker", rank}});
        AddSample(&alive, w.alive() ? 1 : 0, {{"worker", rank}});
      }
      out.push_back(std::move(step));
      out.push_back(std::move(lag));
      out.push_back(std::move(alive));
      auto servers = GaugeFamily("tessera_job_servers_registered",
                                 "Servers that have joined the coordinator.");
      AddSample(&servers, job.servers_size());
      out.push_back(std::move(servers));
    }
    return out;
  }

 private:
  ShardStore* const store_;
  Coordinator* const coordinator_;
  const std::string shard_;
};

}  // namespace

ServiceMetrics::ServiceMetrics(prometheus::Registry& registry, int shard)
    : pushes_(prometheus::BuildCounter()
                  .Name("tessera_pushes_total")
                  .Help("Pushes handled, by outcome.")
                  .Register(registry)),
      applied_(pushes_.Add({{"shard", absl::StrCat(shard)}, {"outcome", "applied"}})),
      duplicate_(pushes_.Add({{"shard", absl::StrCat(shard)}, {"outcome", "duplicate"}})),
      late_(pushes_.Add({{"shard", absl::StrCat(shard)}, {"outcome", "late"}})),
      rejected_(pushes_.Add({{"shard", absl::StrCat(shard)}, {"outcome", "rejected"}})),
      pulls_(prometheus::BuildCounter()
                 .Name("tessera_pulls_total")
                 .Help("Parameter pulls answered (including fused push-pulls).")
                 .Register(registry)
                 .Add({{"shard", absl::StrCat(shard)}})),
      bytes_in_(prometheus::BuildCounter()
                    .Name("tessera_received_bytes_total")
                    .Help("Gradient payload bytes received.")
                    .Register(registry)
                    .Add({{"shard", absl::StrCat(shard)}})),
      bytes_out_(prometheus::BuildCounter()
                     .Name("tessera_sent_bytes_total")
                     .Help("Parameter payload bytes sent.")
                     .Register(registry)
                     .Add({{"shard", absl::StrCat(shard)}})),
      push_seconds_(prometheus::BuildHistogram()
                        .Name("tessera_push_seconds")
                        .Help("Time to validate and apply (or aggregate) a push.")
                        .Register(registry)
                        .Add({{"shard", absl::StrCat(shard)}}, SecondsBuckets())),
      pull_wait_seconds_(prometheus::BuildHistogram()
                             .Name("tessera_pull_wait_seconds")
                             .Help("Time a pull waited for the consistency rule (the "
                                   "synchronous barrier, the staleness bound).")
                             .Register(registry)
                             .Add({{"shard", absl::StrCat(shard)}}, SecondsBuckets())),
      staleness_(prometheus::BuildHistogram()
                     .Name("tessera_push_staleness_updates")
                     .Help("Updates applied between the parameters a gradient was "
                           "computed from and its own apply.")
                     .Register(registry)
                     .Add({{"shard", absl::StrCat(shard)}},
                          prometheus::Histogram::BucketBoundaries{0, 1, 2, 4, 8, 16, 32, 64})) {}

void ServiceMetrics::Push(Outcome outcome, double seconds, double bytes, int64_t staleness) {
  switch (outcome) {
    case Outcome::kApplied:
      applied_.Increment();
      staleness_.Observe(static_cast<double>(staleness));
      break;
    case Outcome::kDuplicate:
      duplicate_.Increment();
      break;
    case Outcome::kLate:
      late_.Increment();
      break;
    case Outcome::kRejected:
      rejected_.Increment();
      break;
  }
  push_seconds_.Observe(seconds);
  bytes_in_.Increment(bytes);
}

void ServiceMetrics::Pull(double wait_seconds, double bytes) {
  pulls_.Increment();
  pull_wait_seconds_.Observe(wait_seconds);
  bytes_out_.Increment(bytes);
}

std::shared_ptr<prometheus::Collectable> MakeStoreCollector(ShardStore* store,
                                                            Coordinator* coordinator) {
  return std::make_shared<StoreCollector>(store, coordinator);
}

}  // namespace tessera
