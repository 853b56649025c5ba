// tessera-server: serves one shard of a job's parameters (shard 0 also
// hosts the coordinator).

#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/allocator.h"
#include "common/discovery.h"
#include "common/flags.h"
#include "common/job_spec.h"
#include "server/server.h"

ABSL_FLAG(int32_t, shard, 0, "Shard index of this server, in [0, job.num_shards).");
ABSL_FLAG(bool, shard_from_hostname, false,
          "Take the shard index from the trailing -N of the hostname (a "
          "StatefulSet pod's ordinal) instead of --shard.");
ABSL_FLAG(std::string, listen, "0.0.0.0:7070",
          "host:port to listen on; port 0 picks a free port (see --port_file).");
ABSL_FLAG(std::string, port_file, "",
          "If set, write the bound port to this file once serving.");
ABSL_FLAG(bool, host_coordinator, true,
          "Host the coordinator when this is shard 0.");
ABSL_FLAG(std::string, coordinator, "",
          "host:port of the coordinator to join (shards other than 0). Until "
          "it has joined, the server answers health checks with NOT_SERVING. "
          "Empty: serve at once.");
ABSL_FLAG(std::string, advertise, "",
          "Address this server gives the coordinator (default: hostname:port).");
ABSL_FLAG(std::string, metrics_listen, "",
          "host:port to serve /metrics on (Prometheus text format); port 0 "
          "picks a free port (see --metrics_port_file). Empty: no metrics.");
ABSL_FLAG(std::string, metrics_port_file, "",
          "If set, write the bound metrics port to this file.");
ABSL_FLAG(int32_t, max_sessions, 0,
          "Most worker streams served at once; more are refused with "
          "RESOURCE_EXHAUSTED (0: 4 per worker + 8).");
ABSL_FLAG(int32_t, apply_threads, 0,
          "Threads that share the per-block work of a push, step or pull "
          "(finiteness check, sums, optimizer, encoding) when the blocks "
          "other than the largest hold 1 MiB or more; results do not depend "
          "on it. 0: the CPUs this process may use (affinity and cgroup "
          "quota), at most 4.");
ABSL_FLAG(int32_t, shutdown_grace_ms, 5000,
          "On SIGTERM/SIGINT, wait this long for in-flight calls.");

namespace {

constexpr char kUsage[] =
    "tessera-server: holds one shard of a Tessera job's parameters.\n\n"
    "Usage: tessera-server --job=JOB.textproto --shard=I [--listen=HOST:PORT]\n\n"
    "Every server and worker of a job reads the same job file. Shard 0 also\n"
    "hosts the coordinator that workers register with.";

int Fail(const std::string& message) {
  std::cerr << "tessera-server: " << message << std::endl;
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  tessera::TuneAllocatorForLargeMessages();
  tessera::ParseFlagsOrExit(argc, argv, kUsage);
  const std::string job_path = tessera::JobFlag();
  if (job_path.empty()) return Fail("--job is required (a JobSpec text file)");
  absl::StatusOr<tessera::v1::JobSpec> job =
      tessera::LoadJob(job_path, tessera::JobOverridesFromFlags());
  if (!job.ok()) return Fail(std::string(job.status().message()));
  int shard = absl::GetFlag(FLAGS_shard);
  char hostname[256] = {0};
  gethostname(hostname, sizeof(hostname) - 1);
  if (absl::GetFlag(FLAGS_shard_from_hostname)) {
    absl::StatusOr<int> ordinal = tessera::OrdinalFromHostname(hostname);
    if (!ordinal.ok()) return Fail(absl::StrCat("--shard_from_hostname: ", ordinal.status().message()));
    shard = *ordinal;
  }
  if (shard < 0 || shard >= job->num_shards()) {
    return Fail(absl::StrCat("--shard=", shard, " is out of range: job.num_shards is ",
                             job->num_shards()));
  }

  // Block the stop signals before any thread starts, so that only the
  // waiting thread below receives them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  tessera::ServerOptions options;
  options.listen_address = absl::GetFlag(FLAGS_listen);
  options.shard = shard;
  options.job = *job;
  options.host_coordinator = shard == 0 && absl::GetFlag(FLAGS_host_coordinator);
  if (!options.host_coordinator) options.coordinator_address = absl::GetFlag(FLAGS_coordinator);
  options.metrics_address = absl::GetFlag(FLAGS_metrics_listen);
  options.security = tessera::SecurityFilesFromFlags();
  options.max_sessions = absl::GetFlag(FLAGS_max_sessions);
  options.apply_threads = absl::GetFlag(FLAGS_apply_threads);
  if (options.apply_threads < 0 || options.apply_threads > 256) {
    return Fail(absl::StrCat("--apply_threads=", options.apply_threads,
                             ": must be 0 (automatic) or in [1, 256]"));
  }
  absl::StatusOr<tessera::SocketTuning> tuning = tessera::SocketTuningFromFlags();
  if (!tuning.ok()) return Fail(std::string(tuning.status().message()));
  options.socket_tuning = *tuning;
  options.allow_shared_memory = tessera::SharedMemoryFromFlags();
  options.advertised_address = absl::GetFlag(FLAGS_advertise);
  if (options.advertised_address.empty()) {
    // A specific listening address names itself; a wildcard one goes by the
    // hostname. A port of 0 is replaced by the bound port once known.
    const std::string& listen = options.listen_address;
    const std::string host = listen.substr(0, listen.rfind(':'));
    const bool wildcard = host.empty() || host == "0.0.0.0" || host == "[::]" || host == "::";
    options.advertised_address =
        absl::StrCat(wildcard ? std::string(hostname) : host, listen.substr(listen.rfind(':')));
  }
  absl::StatusOr<std::unique_ptr<tessera::TesseraServer>> server =
      tessera::TesseraServer::Start(options);
  if (!server.ok()) return Fail(std::string(server.status().message()));
  const int port = (*server)->port();
  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (!port_file.empty() && !tessera::WritePortFile(port_file, port)) {
    return Fail(absl::StrCat("cannot write --port_file '", port_file, "'"));
  }
  const std::string metrics_port_file = absl::GetFlag(FLAGS_metrics_port_file);
  if (!metrics_port_file.empty() &&
      !tessera::WritePortFile(metrics_port_file, (*server)->metrics_port())) {
    return Fail(absl::StrCat("cannot write --metrics_port_file '", metrics_port_file, "'"));
  }
  std::cerr << "tessera-server: shard " << shard << "/" << job->num_shards()
            << " of job '" << job->name() << "' serving on port " << port
            << (options.host_coordinator ? " (with coordinator)" : "");
  if ((*server)->metrics_port() != 0) std::cerr << ", metrics on port " << (*server)->metrics_port();
  std::cerr << std::endl;

  std::thread waiter([&] {
    int sig = 0;
    sigwait(&stop_signals, &sig);
    std::cerr << "tessera-server: shard " << shard << " stopping on signal " << sig
              << std::endl;
    (*server)->Shutdown(absl::Milliseconds(absl::GetFlag(FLAGS_shutdown_grace_ms)));
  });
  const absl::Status stopped = (*server)->Wait();
  if (!stopped.ok()) {
    // The joiner shut the server down; wake the signal waiter ourselves.
    kill(getpid(), SIGTERM);
  }
  waiter.join();
  if (!stopped.ok()) return Fail(std::string(stopped.message()));
  std::cerr << "tessera-server: shard " << shard << " stopped" << std::endl;
  return 0;
}
