#include "common/metrics.h"

#include <dirent.h>
#include <unistd.h>

#include <exception>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/numbers.h"
#include "httplib.h"
#include "prometheus/text_serializer.h"

namespace tessera {
namespace {

class ProcessCollector : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> out;
    const long ticks = sysconf(_SC_CLK_TCK);
    const long page = sysconf(_SC_PAGESIZE);
    // /proc/self/stat: fields after the parenthesised command name.
    std::ifstream stat("/proc/self/stat");
    std::string line;
    std::getline(stat, line);
    const size_t close = line.rfind(')');
    if (close != std::string::npos) {
      std::vector<std::string> f = absl::StrSplit(line.substr(close + 2), ' ');
      // f[0] is field 3 (state): utime is field 14, stime 15, starttime 22,
      // vsize 23, rss 24.
      if (f.size() > 21) {
        auto field = [&](int n) { return std::stod(f[n - 3]); };
        auto cpu = CounterFamily("process_cpu_seconds_total",
                                 "User and system CPU time spent in seconds.");
        AddSample(&cpu, (field(14) + field(15)) / ticks);
        out.push_back(std::move(cpu));
        auto vsize = GaugeFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.");
        AddSample(&vsize, field(23));
        out.push_back(std::move(vsize));
        auto rss = GaugeFamily("process_resident_memory_bytes", "Resident memory size in bytes.");
        AddSample(&rss, field(24) * page);
        out.push_back(std::move(rss));
        std::ifstream up("/proc/stat");
        std::string key;
        double boot = 0;
        while (up >> key) {
          if (key == "btime") {
            up >> boot;
            break;
          }
        }
        auto start = GaugeFamily("process_start_time_seconds",
                                 "Start time of the process since unix epoch in seconds.");
        AddSample(&start, boot + field(22) / ticks);
        out.push_back(std::move(start));
      }
    }
    int fds = 0;
    if (DIR* d = opendir("/proc/self/fd")) {
      while (dirent* e = readdir(d)) fds += e->d_name[0] != '.';
      closedir(d);
    }
    auto open_fds = GaugeFamily("process_open_fds", "Number of open file descriptors.");
    AddSample(&open_fds, fds);
    out.push_back(std::move(open_fds));
    return out;
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsEndpoint>> MetricsEndpoint::Start(
    const std::string& address) {
  const size_t colon = address.rfind(':');
  int port = -1;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port) ||
      port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics address '", address, "' is not host:port"));
  }
  std::string host = address.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  std::unique_ptr<MetricsEndpoint> m(new MetricsEndpoint());
  m->registry_ = std::make_shared<prometheus::Registry>();
  m->extra_.push_back(MakeProcessCollector());
  m->http_ = std::make_unique<httplib::Server>();
  MetricsEndpoint* self = m.get();
  m->http_->Get("/metrics", [self](const httplib::Request&, httplib::Response& res) {
    res.set_content(self->Render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  if (port == 0) {
    port = m->http_->bind_to_any_port(host);
  } else if (!m->http_->bind_to_port(host, port)) {
    port = -1;
  }
  if (port <= 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", address, " (address in use or not available)"));
  }
  m->port_ = port;
  m->thread_ = std::thread([self] { self->http_->listen_after_bind(); });
  return m;
}

MetricsEndpoint::~MetricsEndpoint() {
  if (http_ != nullptr) http_->stop();
  if (thread_.joinable()) thread_.join();
}

void MetricsEndpoint::Add(std::shared_ptr<prometheus::Collectable> collectable) {
  extra_.push_back(std::move(collectable));
}

std::string MetricsEndpoint::Render() const {
  std::vector<prometheus::MetricFamily> families = registry_->Collect();
  for (const auto& c : extra_) {
    std::vector<prometheus::MetricFamily> more = c->Collect();
    families.insert(families.end(), std::make_move_iterator(more.begin()),
                    std::make_move_iterator(more.end()));
  }
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, families);
  return out.str();
}

std::shared_ptr<prometheus::Collectable> MakeProcessCollector() {
  return std::make_shared<ProcessCollector>();
}

prometheus::MetricFamily GaugeFamily(std::string name, std::string help) {
  prometheus::MetricFamily f;
  f.name = std::move(name);
  f.help = std::move(help);
  f.type = prometheus::MetricType::Gauge;
  return f;
}

prometheus::MetricFamily CounterFamily(std::string name, std::string help) {
  prometheus::MetricFamily f;
  f.name = std::move(name);
  f.help = std::move(help);
  f.type = prometheus::MetricType::Counter;
  return f;
}

void AddSample(prometheus::MetricFamily* family, double value,
               std::vector<std::pair<std::string, std::string>> labels) {
  prometheus::ClientMetric m;
  for (auto& [k, v] : labels) m.label.push_back({std::move(k), std::move(v)});
  if (family->type == prometheus::MetricType::Counter) {
    m.counter.value = value;
  } else {
    m.gauge.value = value;
  }
  family->metric.push_back(std::move(m));
}

}  // namespace tessera
