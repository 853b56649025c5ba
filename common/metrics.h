// /metrics in the Prometheus text format: metrics kept with prometheus-cpp's
// core library, served over HTTP by cpp-httplib, plus the process_* metrics
// every exporter is expected to have.

#ifndef TESSERA_COMMON_METRICS_H_
#define TESSERA_COMMON_METRICS_H_

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "prometheus/collectable.h"
#include "prometheus/metric_family.h"
#include "prometheus/registry.h"

namespace httplib {
class Server;
}

namespace tessera {

// An HTTP endpoint serving /metrics from a registry and any number of
// collectables. Thread-safe.
class MetricsEndpoint {
 public:
  // `address` is host:port; port 0 picks a free one (see port()).
  // kUnavailable naming the address when it cannot listen.
  static absl::StatusOr<std::unique_ptr<MetricsEndpoint>> Start(const std::string& address);
  ~MetricsEndpoint();

  int port() const { return port_; }
  prometheus::Registry& registry() { return *registry_; }
  // Serves `collectable` too, keeping it alive as long as this endpoint.
  // Call before the first scrape can matter: the list is not locked.
  void Add(std::shared_ptr<prometheus::Collectable> collectable);

  // The text a scrape returns.
  std::string Render() const;

 private:
  MetricsEndpoint() = default;
  std::unique_ptr<httplib::Server> http_;
  std::thread thread_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::vector<std::shared_ptr<prometheus::Collectable>> extra_;
  int port_ = 0;
};

// process_cpu_seconds_total, process_resident_memory_bytes,
// process_virtual_memory_bytes, process_open_fds and
// process_start_time_seconds, read from /proc at scrape time.
std::shared_ptr<prometheus::Collectable> MakeProcessCollector();

// Builders for collectables that compute their numbers at scrape time.
prometheus::MetricFamily GaugeFamily(std::string name, std::string help);
prometheus::MetricFamily CounterFamily(std::string name, std::string help);
// Appends a sample with `labels` (name, value pairs) to `family`.
void AddSample(prometheus::MetricFamily* family, double value,
               std::vector<std::pair<std::string, std::string>> labels = {});

}  // namespace tessera

#endif  // TESSERA_COMMON_METRICS_H_
