// tessera: the command line for people. `tessera local` runs a whole job
// on this machine; `tessera status` shows a running job; `tessera diagram`
// draws it; `tessera eval` scores a checkpoint.

#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/flags.h"
#include "common/grpc_status.h"
#include "common/job_spec.h"
#include "cli/diagram.h"
#include "cli/eval.h"
#include "cli/status.h"
#include "common/subprocess.h"
#include "proto/health.grpc.pb.h"
#include "proto/tessera.grpc.pb.h"

ABSL_FLAG(int32_t, servers, 2, "local: number of parameter servers (shards).");
ABSL_FLAG(int32_t, workers, 2, "local: number of workers.");
ABSL_FLAG(std::string, log_dir, "",
          "local: folder for the servers' and other workers' logs "
          "(default: a new folder under $TMPDIR or /tmp).");
ABSL_FLAG(std::string, summary_json, "",
          "local: passed to worker 0; eval: write the figures as JSON to this file.");
ABSL_FLAG(std::string, logdir, "",
          "local: passed to worker 0, which writes TensorBoard event files there.");
ABSL_FLAG(std::string, checkpoint, "",
          "eval: checkpoint folder (default: job.checkpoint.dir); the newest "
          "complete checkpoint in it is evaluated.");
ABSL_FLAG(std::string, dump_params, "", "local: passed to worker 0.");
ABSL_FLAG(std::string, device, "auto", "local: passed to every worker.");
ABSL_FLAG(std::string, bin_dir, "",
          "local: folder holding tessera-server and tessera-worker "
          "(default: this program's folder).");
ABSL_FLAG(int32_t, startup_timeout_s, 30, "local: seconds to wait for servers to listen.");
ABSL_FLAG(bool, once, false, "status: print once instead of refreshing on a terminal.");
ABSL_FLAG(bool, metrics, true,
          "local: serve /metrics from every process on a free 127.0.0.1 port.");

namespace {

constexpr char kUsage[] =
    "tessera: run and inspect Tessera training jobs.\n\n"
    "Usage:\n"
    "  tessera local --job=JOB.textproto [--servers=2] [--workers=2] [overrides]\n"
    "      Start servers and workers on 127.0.0.1, show worker 0's progress,\n"
    "      stop everything on exit, error or Ctrl-C.\n"
    "  tessera checkpoint HOST:PORT[,HOST:PORT...]\n"
    "      Ask each server for a checkpoint now (job.checkpoint.dir must be set).\n"
    "  tessera health HOST:PORT\n"
    "      Exit 0 when the server answers SERVING (joined and ready), 1 otherwise.\n"
    "  tessera status ADDR [--once]\n"
    "      Show the job as the coordinator at ADDR (host:port of shard 0) sees it.\n"
    "  tessera diagram ADDR [--job=JOB.textproto] | --job=JOB.textproto\n"
    "      Print the cluster and its training loop as a Mermaid flowchart: live\n"
    "      from the coordinator at ADDR (--job adds the model and consistency\n"
    "      mode), or as the job file plans it.\n"
    "  tessera eval --checkpoint=DIR --job=JOB.textproto [--summary_json=FILE]\n"
    "      Evaluate the newest complete checkpoint in DIR on the job's held-out\n"
    "      data (CPU).\n";

int Fail(const std::string& message) {
  std::cerr << "tessera: " << message << std::endl;
  return 1;
}

std::string TailOfFile(const std::string& path, int lines) {
  std::ifstream in(path);
  std::vector<std::string> all;
  for (std::string line; std::getline(in, line);) all.push_back(line);
  const size_t from = all.size() > static_cast<size_t>(lines) ? all.size() - lines : 0;
  std::string out;
  for (size_t i = from; i < all.size(); ++i) absl::StrAppend(&out, "    ", all[i], "\n");
  return out;
}

struct Child {
  std::string name;
  std::string log;  // empty when output goes to the terminal
  std::unique_ptr<tessera::Subprocess> process;
};

// Stops every child still running: SIGTERM, then SIGKILL after `grace`.
void StopAll(std::vector<Child>& children, absl::Duration grace) {
  for (Child& c : children) c.process->Signal(SIGTERM);
  const absl::Time deadline = absl::Now() + grace;
  for (Child& c : children) {
    if (!c.process->Wait(std::max(absl::ZeroDuration(), deadline - absl::Now()))) {
      c.process->Signal(SIGKILL);
      c.process->Wait(absl::InfiniteDuration());
    }
  }
}

std::string FailureReport(const Child& c, int status) {
  std::string out = absl::StrCat(c.name, " exited with status ", status);
  if (!c.log.empty()) {
    absl::StrAppend(&out, "; last lines of ", c.log, ":\n", TailOfFile(c.log, 15));
  }
  return out;
}

// Waits for a server's port file; fails when the server exits first or the
// deadline passes.
absl::StatusOr<int> WaitForPort(Child& server, const std::string& port_file,
                                absl::Time deadline) {
  while (true) {
    std::ifstream in(port_file);
    int port = 0;
    if (in >> port && port > 0) return port;
    if (std::optional<int> status = server.process->Poll()) {
      return absl::FailedPreconditionError(FailureReport(server, *status));
    }
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat(server.name, " did not start listening; see ", server.log));
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
}

int RunLocal() {
  const std::string job_path = tessera::JobFlag();
  if (job_path.empty()) return Fail("local: --job is required");
  const int num_servers = absl::GetFlag(FLAGS_servers);
  const int num_workers = absl::GetFlag(FLAGS_workers);
  if (num_servers < 1) return Fail("local: --servers must be at least 1");
  if (num_workers < 1) return Fail("local: --workers must be at least 1");
  tessera::JobOverrides overrides = tessera::JobOverridesFromFlags();
  overrides.num_shards = num_servers;
  overrides.num_workers = num_workers;
  // Validate here so that a bad job file fails before any process starts.
  absl::StatusOr<tessera::v1::JobSpec> job = tessera::LoadJob(job_path, overrides);
  if (!job.ok()) return Fail(std::string(job.status().message()));

  std::string bin_dir = absl::GetFlag(FLAGS_bin_dir);
  if (bin_dir.empty()) bin_dir = tessera::ThisExecutableDir();
  std::string log_dir = absl::GetFlag(FLAGS_log_dir);
  if (log_dir.empty()) {
    const char* tmp = getenv("TMPDIR");
    std::string pattern = absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/tessera-local-XXXXXX");
    if (mkdtemp(pattern.data()) == nullptr) return Fail("local: cannot create a log folder");
    log_dir = pattern;
  } else if (access(log_dir.c_str(), W_OK) != 0) {
    return Fail(absl::StrCat("local: --log_dir '", log_dir, "' is not a writable folder"));
  }

  std::vector<std::string> common = tessera::ForwardedJobFlags();
  for (std::string& flag : tessera::ForwardedSecurityFlags()) common.push_back(std::move(flag));
  common.push_back(absl::StrCat("--job=", job_path));
  common.push_back(absl::StrCat("--num_shards=", num_servers));
  common.push_back(absl::StrCat("--num_workers=", num_workers));

  // Stop signals are handled by the loop below; children unblock them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  sigprocmask(SIG_BLOCK, &stop_signals, nullptr);

  // Shard 0 hosts the coordinator; the other shards join it, so they start
  // once its port is known.
  std::vector<Child> servers;
  std::vector<std::string> addresses(num_servers);
  const absl::Time deadline =
      absl::Now() + absl::Seconds(absl::GetFlag(FLAGS_startup_timeout_s));
  for (int s = 0; s < num_servers; ++s) {
    const std::string port_file = absl::StrCat(log_dir, "/server-", s, ".port");
    tessera::SpawnOptions opt;
    opt.argv = {absl::StrCat(bin_dir, "/tessera-server"), absl::StrCat("--shard=", s),
                "--listen=127.0.0.1:0", absl::StrCat("--port_file=", port_file)};
    if (s > 0) opt.argv.push_back(absl::StrCat("--coordinator=", addresses[0]));
    if (absl::GetFlag(FLAGS_metrics)) {
      opt.argv.push_back("--metrics_listen=127.0.0.1:0");
      opt.argv.push_back(absl::StrCat("--metrics_port_file=", log_dir, "/server-", s, ".metrics"));
    }
    opt.argv.insert(opt.argv.end(), common.begin(), common.end());
    opt.stdout_path = opt.stderr_path = absl::StrCat(log_dir, "/server-", s, ".log");
    unlink(port_file.c_str());
    absl::StatusOr<std::unique_ptr<tessera::Subprocess>> p = tessera::Subprocess::Spawn(opt);
    if (!p.ok()) {
      StopAll(servers, absl::Seconds(5));
      return Fail(std::string(p.status().message()));
    }
    servers.push_back({absl::StrCat("server ", s), opt.stdout_path, *std::move(p)});
    if (s == 0 || s == num_servers - 1) {
      // Wait for the port files written so far (shard 0 alone, then the rest).
      for (int w = s == 0 ? 0 : 1; w <= s; ++w) {
        absl::StatusOr<int> port = WaitForPort(servers[w], absl::StrCat(log_dir, "/server-", w, ".port"), deadline);
        if (!port.ok()) {
          StopAll(servers, absl::Seconds(5));
          return Fail(std::string(port.status().message()));
        }
        addresses[w] = absl::StrCat("127.0.0.1:", *port);
      }
    }
  }
  std::cerr << "tessera: " << num_servers << " servers on " << absl::StrJoin(addresses, ",")
            << ", " << num_workers << " workers; logs in " << log_dir;
  if (absl::GetFlag(FLAGS_metrics)) {
    std::vector<std::string> metrics;
    for (int s = 0; s < num_servers; ++s) {
      std::ifstream in(absl::StrCat(log_dir, "/server-", s, ".metrics"));
      int port = 0;
      if (in >> port) metrics.push_back(absl::StrCat("http://127.0.0.1:", port, "/metrics"));
    }
    std::cerr << "; server metrics at " << absl::StrJoin(metrics, " ")
              << " (workers' ports in " << log_dir << "/worker-*.metrics)";
  }
  std::cerr << std::endl;

  std::vector<Child> workers;
  for (int r = 0; r < num_workers; ++r) {
    tessera::SpawnOptions opt;
    opt.argv = {absl::StrCat(bin_dir, "/tessera-worker"), absl::StrCat("--rank=", r),
                absl::StrCat("--servers=", absl::StrJoin(addresses, ",")),
                absl::StrCat("--device=", absl::GetFlag(FLAGS_device))};
    if (absl::GetFlag(FLAGS_metrics)) {
      opt.argv.push_back("--metrics_listen=127.0.0.1:0");
      opt.argv.push_back(absl::StrCat("--metrics_port_file=", log_dir, "/worker-", r, ".metrics"));
    }
    opt.argv.insert(opt.argv.end(), common.begin(), common.end());
    std::string log;
    if (r == 0) {
      if (!absl::GetFlag(FLAGS_summary_json).empty()) {
        opt.argv.push_back(absl::StrCat("--summary_json=", absl::GetFlag(FLAGS_summary_json)));
      }
      if (!absl::GetFlag(FLAGS_dump_params).empty()) {
        opt.argv.push_back(absl::StrCat("--dump_params=", absl::GetFlag(FLAGS_dump_params)));
      }
      if (!absl::GetFlag(FLAGS_logdir).empty()) {
        opt.argv.push_back(absl::StrCat("--logdir=", absl::GetFlag(FLAGS_logdir)));
      }
    } else {
      log = absl::StrCat(log_dir, "/worker-", r, ".log");
      opt.stdout_path = opt.stderr_path = log;
    }
    absl::StatusOr<std::unique_ptr<tessera::Subprocess>> p = tessera::Subprocess::Spawn(opt);
    if (!p.ok()) {
      StopAll(workers, absl::Seconds(5));
      StopAll(servers, absl::Seconds(5));
      return Fail(std::string(p.status().message()));
    }
    workers.push_back({absl::StrCat("worker ", r), log, *std::move(p)});
  }

  // Supervise: the job succeeds when every worker exits 0; any failure or
  // a stop signal ends every process.
  int result = 0;
  std::string failure;
  size_t done = 0;
  std::vector<bool> finished(num_workers, false);
  const struct timespec tick = {0, 50 * 1000 * 1000};
  while (done < workers.size()) {
    const int sig = sigtimedwait(&stop_signals, nullptr, &tick);
    if (sig > 0) {
      failure = absl::StrCat("stopped by signal ", sig);
      result = 128 + sig;
      break;
    }
    for (int r = 0; r < num_workers; ++r) {
      if (finished[r]) continue;
      if (std::optional<int> status = workers[r].process->Poll()) {
        finished[r] = true;
        ++done;
        if (*status != 0 && result == 0) {
          failure = FailureReport(workers[r], *status);
          result = 1;
        }
      }
    }
    if (result != 0) break;
    for (Child& s : servers) {
      if (std::optional<int> status = s.process->Poll()) {
        failure = FailureReport(s, *status);
        result = 1;
        break;
      }
    }
    if (result != 0) break;
  }
  if (result != 0) {
    // Stopping early: servers first, so that they write their final
    // checkpoints with whole steps before the workers' streams drop.
    StopAll(servers, absl::Seconds(10));
    StopAll(workers, absl::Seconds(5));
  } else {
    StopAll(workers, absl::Seconds(5));
    StopAll(servers, absl::Seconds(10));
  }
  if (result != 0) {
    std::cerr << "tessera: " << failure << std::endl;
    return result;
  }
  return 0;
}

// Asks every listed server for a checkpoint and prints where each went.
int RunCheckpoint(const std::string& addresses) {
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> creds =
      tessera::MakeChannelCredentials(tessera::SecurityFilesFromFlags(), /*admin=*/true);
  if (!creds.ok()) return Fail(std::string(creds.status().message()));
  const std::shared_ptr<grpc::ChannelCredentials> credentials = *creds;
  int failures = 0;
  for (absl::string_view address : absl::StrSplit(addresses, ',', absl::SkipEmpty())) {
    auto channel = grpc::CreateChannel(std::string(address), credentials);
    auto stub = tessera::v1::ParameterService::NewStub(channel);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    tessera::v1::CheckpointResponse response;
    absl::Status s = tessera::FromGrpcStatus(
        stub->Checkpoint(&ctx, tessera::v1::CheckpointRequest(), &response));
    if (s.ok()) {
      std::cout << address << ": step " << response.step() << " -> " << response.path() << "\n";
    } else {
      std::cout << address << ": " << s.ToString() << "\n";
      ++failures;
    }
  }
  return failures == 0 ? 0 : 1;
}

// Exit 0 only when the server at `address` answers SERVING.
int RunHealth(const std::string& address) {
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
      tessera::MakeChannelCredentials(tessera::SecurityFilesFromFlags());
  if (!credentials.ok()) return Fail(std::string(credentials.status().message()));
  auto channel = grpc::CreateChannel(address, *credentials);
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(3));
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status s = stub->Check(&ctx, grpc::health::v1::HealthCheckRequest(), &response);
  if (!s.ok()) {
    std::cout << address << ": " << tessera::FromGrpcStatus(s).ToString() << std::endl;
    return 1;
  }
  std::cout << address << ": "
            << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status())
            << std::endl;
  return response.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
}

// Prints the job's status; on a terminal it refreshes every second until
// Ctrl-C, unless --once.
int RunStatus(const std::string& address) {
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
      tessera::MakeChannelCredentials(tessera::SecurityFilesFromFlags());
  if (!credentials.ok()) return Fail(std::string(credentials.status().message()));
  const bool refresh = !absl::GetFlag(FLAGS_once) && isatty(STDOUT_FILENO);
  while (true) {
    absl::StatusOr<tessera::StatusView> view =
        tessera::FetchStatus(address, *credentials, absl::Seconds(5));
    if (!view.ok() && !refresh) return Fail(std::string(view.status().message()));
    if (refresh) std::cout << "\033[H\033[2J";  // home, clear screen
    std::cout << (view.ok() ? tessera::RenderStatus(*view) : std::string(view.status().message()))
              << std::flush;
    if (!refresh) return 0;
    absl::SleepFor(absl::Seconds(1));
  }
}

// Prints the Mermaid flowchart of the job at `address` (live) or, with
// `address` empty, of the job file.
int RunDiagram(const std::string& address) {
  const std::string job_path = tessera::JobFlag();
  if (address.empty() && job_path.empty()) {
    return Fail("usage: tessera diagram HOST:PORT [--job=FILE] | --job=FILE");
  }
  std::optional<tessera::v1::JobSpec> job;
  if (!job_path.empty()) {
    absl::StatusOr<tessera::v1::JobSpec> loaded =
        tessera::LoadJob(job_path, tessera::JobOverridesFromFlags());
    if (!loaded.ok()) return Fail(std::string(loaded.status().message()));
    job = *std::move(loaded);
  }
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> creds =
      tessera::MakeChannelCredentials(tessera::SecurityFilesFromFlags());
  if (!creds.ok()) return Fail(std::string(creds.status().message()));
  const std::shared_ptr<grpc::ChannelCredentials> credentials = *creds;
  absl::StatusOr<tessera::ClusterPicture> picture =
      address.empty()
          ? tessera::ClusterFromJob(*job, job_path)
          : tessera::ClusterFromCoordinator(address, job ? &*job : nullptr, absl::Seconds(5),
                                            credentials);
  if (!picture.ok()) return Fail(absl::StrCat("diagram: ", picture.status().message()));
  std::cout << tessera::MermaidFlowchart(*picture);
  return 0;
}

// Evaluates the newest complete checkpoint on the job's held-out data.
int RunEval() {
  const std::string job_path = tessera::JobFlag();
  if (job_path.empty()) return Fail("eval: --job is required");
  absl::StatusOr<tessera::v1::JobSpec> job =
      tessera::LoadJob(job_path, tessera::JobOverridesFromFlags());
  if (!job.ok()) return Fail(std::string(job.status().message()));
  std::string dir = absl::GetFlag(FLAGS_checkpoint);
  if (dir.empty()) dir = job->checkpoint().dir();
  if (dir.empty()) return Fail("eval: --checkpoint is required (the job sets no checkpoint.dir)");
  absl::StatusOr<tessera::CheckpointEvaluation> e = tessera::EvaluateCheckpoint(*job, dir);
  if (!e.ok()) return Fail(absl::StrCat("eval: ", e.status().message()));
  std::cout << tessera::FormatEvaluation(*e) << std::endl;
  const std::string summary_path = absl::GetFlag(FLAGS_summary_json);
  if (!summary_path.empty()) {
    std::ofstream out(summary_path);
    out << tessera::EvaluationJson(*e);
    if (!out.good()) {
      return Fail(absl::StrCat("eval: cannot write --summary_json '", summary_path, "'"));
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> args = tessera::ParseFlagsOrExit(argc, argv, kUsage);
  if (args.size() < 2) {
    std::cerr << kUsage;
    return 2;
  }
  const std::string command = args[1];
  if (command == "local") {
    if (args.size() != 2) return Fail("local takes no positional arguments");
    return RunLocal();
  }
  if (command == "checkpoint") {
    if (args.size() != 3) return Fail("usage: tessera checkpoint HOST:PORT[,HOST:PORT...]");
    return RunCheckpoint(args[2]);
  }
  if (command == "health") {
    if (args.size() != 3) return Fail("usage: tessera health HOST:PORT");
    return RunHealth(args[2]);
  }
  if (command == "status") {
    if (args.size() != 3) return Fail("usage: tessera status HOST:PORT");
    return RunStatus(args[2]);
  }
  if (command == "diagram") {
    if (args.size() > 3) return Fail("usage: tessera diagram HOST:PORT [--job=FILE] | --job=FILE");
    return RunDiagram(args.size() == 3 ? args[2] : "");
  }
  if (command == "eval") {
    if (args.size() != 2) return Fail("usage: tessera eval --checkpoint=DIR --job=FILE");
    return RunEval();
  }
  return Fail(absl::StrCat("unknown command '", command, "'; see tessera --help"));
}
