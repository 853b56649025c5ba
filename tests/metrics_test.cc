// /metrics on running servers and workers: the text passes promtool's
// checks, and a real Prometheus server on 127.0.0.1 scrapes the series.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <regex>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "tests/cluster_util.h"

namespace tessera {
namespace {

using testing_util::Bin;
using testing_util::NewTempDir;
using testing_util::ReadFile;
using testing_util::RunProgram;
using testing_util::RunResult;
using testing_util::ServerProcess;
using testing_util::SourceDir;
using testing_util::WriteFile;

// GET http://127.0.0.1:port/path; returns the body ("" on failure).
std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval timeout{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "";
  }
  const std::string request = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  if (write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
    close(fd);
    return "";
  }
  std::string response;
  char buf[8192];
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) response.append(buf, n);
  close(fd);
  const size_t body = response.find("\r\n\r\n");
  return body == std::string::npos ? "" : response.substr(body + 4);
}

int ReadPort(const std::string& path, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    std::ifstream in(path);
    int port = 0;
    if (in >> port && port > 0) return port;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return 0;
}

// Value of the first sample of `metric` whose line contains `match`.
double Sample(const std::string& text, const std::string& metric, const std::string& match) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (absl::StartsWith(line, metric) && absl::StrContains(line, match)) {
      return std::stod(std::string(line.substr(line.rfind(' ') + 1)));
    }
  }
  return -1;
}

class MetricsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = NewTempDir("metrics");
    const std::string job = SourceDir() + "/examples/seed_regression.textproto";
    const std::vector<std::string> common = {"--job=" + job, "--epochs=100000",
                                             "--metrics_listen=127.0.0.1:0"};
    for (int s = 0; s < 2; ++s) {
      std::vector<std::string> flags = common;
      flags.push_back(absl::StrCat("--shard=", s));
      flags.push_back(absl::StrCat("--apply_threads=", s + 2));
      flags.push_back(absl::StrCat("--metrics_port_file=", dir_, "/server-", s, ".metrics"));
      if (s == 1) flags.push_back("--coordinator=" + servers_[0]->address());
      servers_.push_back(ServerProcess::Start(dir_, flags));
      ASSERT_NE(servers_.back(), nullptr);
      metrics_ports_.push_back(ReadPort(absl::StrCat(dir_, "/server-", s, ".metrics"), absl::Seconds(10)));
    }
    for (int r = 0; r < 2; ++r) {
      SpawnOptions opt;
      opt.argv = {Bin("tessera-worker"), absl::StrCat("--rank=", r),
                  "--servers=" + servers_[0]->address() + "," + servers_[1]->address(),
                  absl::StrCat("--metrics_port_file=", dir_, "/worker-", r, ".metrics")};
      opt.argv.insert(opt.argv.end(), common.begin(), common.end());
      opt.stdout_path = opt.stderr_path = absl::StrCat(dir_, "/worker-", r, ".log");
      auto p = Subprocess::Spawn(opt);
      ASSERT_TRUE(p.ok());
      workers_.push_back(*std::move(p));
      metrics_ports_.push_back(ReadPort(absl::StrCat(dir_, "/worker-", r, ".metrics"), absl::Seconds(20)));
    }
    for (int port : metrics_ports_) ASSERT_GT(port, 0);
    // Let training run for a moment.
    const absl::Time deadline = absl::Now() + absl::Seconds(20);
    while (Sample(HttpGet(metrics_ports_[2], "/metrics"), "tessera_worker_steps_total", "") < 50 &&
           absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(50));
    }
  }

  std::string dir_;
  std::vector<std::unique_ptr<ServerProcess>> servers_;
  std::vector<std::unique_ptr<Subprocess>> workers_;
  std::vector<int> metrics_ports_;  // server 0, server 1, worker 0, worker 1
};

TEST_F(MetricsTest, EveryProcessServesValidMetrics) {
  for (size_t i = 0; i < metrics_ports_.size(); ++i) {
    SCOPED_TRACE(i < 2 ? absl::StrCat("server ", i) : absl::StrCat("worker ", i - 2));
    const std::string text = HttpGet(metrics_ports_[i], "/metrics");
    ASSERT_FALSE(text.empty());
    const std::string file = absl::StrCat(dir_, "/scrape-", i, ".txt");
    WriteFile(file, text);
    RunResult check = RunProgram({"/bin/sh", "-c", "promtool check metrics < " + file}, dir_,
                                 absl::Seconds(30));
    EXPECT_EQ(check.status, 0) << check.output;
    EXPECT_GT(Sample(text, "process_resident_memory_bytes", ""), 1e6);
    EXPECT_GT(Sample(text, "process_open_fds", ""), 3);
    if (i < 2) {
      const std::string shard = absl::StrCat("shard=\"", i, "\"");
      EXPECT_GT(Sample(text, "tessera_pushes_total", "outcome=\"applied\""), 0) << text;
      EXPECT_GT(Sample(text, "tessera_pulls_total", shard), 0);
      EXPECT_GT(Sample(text, "tessera_received_bytes_total", shard), 0);
      EXPECT_GT(Sample(text, "tessera_shard_version", shard), 0);
      EXPECT_EQ(Sample(text, "tessera_shard_live_workers", shard), 2);
      EXPECT_GT(Sample(text, "tessera_shard_param_bytes", shard), 0);
      // --apply_threads reaches the store; this job's shards are far too
      // small for the threads to share anything.
      EXPECT_EQ(Sample(text, "tessera_shard_apply_threads", shard), i + 2);
      EXPECT_EQ(Sample(text, "tessera_shard_apply_shared_total", shard), 0);
      EXPECT_GT(Sample(text, "tessera_pull_wait_seconds_count", shard), 0);
      EXPECT_EQ(Sample(text, "tessera_shard_rejected_updates_total", "nonfinite"), 0);
      if (i == 0) {
        // Only shard 0 hosts the coordinator and knows every worker's step.
        EXPECT_GE(Sample(text, "tessera_worker_lag_steps", "worker=\"1\""), 0) << text;
        EXPECT_EQ(Sample(text, "tessera_job_servers_registered", ""), 2);
      }
    } else {
      EXPECT_GT(Sample(text, "tessera_worker_steps_total", ""), 0) << text;
      EXPECT_GT(Sample(text, "tessera_worker_step_seconds_count", ""), 0);
      EXPECT_GE(Sample(text, "tessera_worker_train_loss", ""), 0);
    }
  }
}

TEST_F(MetricsTest, PrometheusScrapesTheCluster) {
  const int port = testing_util::FreePort();
  std::string targets;
  for (int p : metrics_ports_) absl::StrAppend(&targets, targets.empty() ? "" : ", ", "'127.0.0.1:", p, "'");
  WriteFile(dir_ + "/prometheus.yml",
            absl::StrCat("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                         "scrape_configs:\n  - job_name: tessera\n    static_configs:\n"
                         "      - targets: [", targets, "]\n"));
  SpawnOptions opt;
  opt.argv = {"/usr/bin/prometheus", "--config.file=" + dir_ + "/prometheus.yml",
              "--storage.tsdb.path=" + dir_ + "/tsdb",
              absl::StrCat("--web.listen-address=127.0.0.1:", port)};
  opt.stdout_path = opt.stderr_path = dir_ + "/prometheus.log";
  auto prometheus = Subprocess::Spawn(opt);
  ASSERT_TRUE(prometheus.ok()) << prometheus.status();
  // Wait until both workers' and both shards' series have arrived.
  const std::regex series("\"worker\":\"([01])\"");
  std::string workers, shards;
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (absl::Now() < deadline) {
    workers = HttpGet(port, "/api/v1/query?query=tessera_worker_steps_total");
    shards = HttpGet(port, "/api/v1/query?query=tessera_shard_version");
    if (absl::StrContains(workers, "\"worker\":\"0\"") &&
        absl::StrContains(workers, "\"worker\":\"1\"") &&
        absl::StrContains(shards, "\"shard\":\"0\"") && absl::StrContains(shards, "\"shard\":\"1\"")) {
      break;
    }
    absl::SleepFor(absl::Milliseconds(250));
  }
  EXPECT_TRUE(absl::StrContains(workers, "\"status\":\"success\"")) << workers;
  EXPECT_TRUE(absl::StrContains(workers, "\"worker\":\"0\"")) << workers << "\n"
                                                              << ReadFile(dir_ + "/prometheus.log");
  EXPECT_TRUE(absl::StrContains(workers, "\"worker\":\"1\"")) << workers;
  EXPECT_TRUE(absl::StrContains(shards, "\"shard\":\"0\"")) << shards;
  EXPECT_TRUE(absl::StrContains(shards, "\"shard\":\"1\"")) << shards;
  const std::string up = HttpGet(port, "/api/v1/query?query=sum(up)");
  EXPECT_TRUE(absl::StrContains(up, "\"4\"")) << up;  // all four targets up
}

}  // namespace
}  // namespace tessera
