// One Tessera server process's gRPC server: a shard's ParameterService,
// optionally the CoordinatorService, health checking and reflection.

#ifndef TESSERA_SERVER_SERVER_H_
#define TESSERA_SERVER_SERVER_H_

#include <memory>
#include <string>
#include <thread>

#include <grpcpp/server.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "common/socket_tuning.h"
#include "proto/tessera.pb.h"
#include "server/checkpointer.h"
#include "common/credentials.h"
#include "common/metrics.h"
#include "server/coordinator.h"
#include "server/parameter_service.h"
#include "server/server_metrics.h"
#include "server/shard_store.h"

namespace tessera {

struct ServerOptions {
  // host:port to listen on; port 0 picks a free one (see port()).
  std::string listen_address = "127.0.0.1:0";
  int shard = 0;
  // Validated job.
  tessera::v1::JobSpec job;
  // Whether this process hosts the coordinator (by default shard 0 does).
  bool host_coordinator = true;
  // Coordinator to join (host:port) when this process does not host it.
  // Empty: serve at once without joining.
  std::string coordinator_address;
  // How this server names itself to the coordinator (for status displays).
  std::string advertised_address;
  // host:port for /metrics (Prometheus text format); empty: none.
  std::string metrics_address;
  // TLS, mutual TLS and tokens (see common/credentials.h); also used to
  // join the coordinator.
  SecurityFiles security;
  // Streams served at once (0: 4 per worker + 8); more are shed with
  // RESOURCE_EXHAUSTED.
  int max_sessions = 0;
  // TCP options for the listening socket, the connections it accepts and
  // the channel to the coordinator.
  SocketTuning socket_tuning;
  // Accept workers' same-host shared-memory regions (common/shared_region.h).
  bool allow_shared_memory = true;
  // Threads that share the per-block work of large pushes, steps and
  // pulls (ShardStore::SetApplyThreads); 0: DefaultApplyThreads().
  int apply_threads = 1;
};

// A running server. Thread-safe.
class TesseraServer {
 public:
  // Builds the store and starts serving. kUnavailable naming the address
  // when it cannot listen (for example, the port is in use: SO_REUSEPORT is
  // off so a clash fails instead of silently sharing the port).
  static absl::StatusOr<std::unique_ptr<TesseraServer>> Start(
      const ServerOptions& options);

  ~TesseraServer();

  int port() const { return port_; }
  // Port of /metrics; 0 when not served.
  int metrics_port() const { return metrics_ == nullptr ? 0 : metrics_->port(); }
  ShardStore* store() { return store_.get(); }

  // Stops taking new calls, wakes waiting pulls and waits up to `grace` for
  // in-flight calls before cancelling them.
  void Shutdown(absl::Duration grace);
  // Blocks until the server has shut down. Returns why it stopped when that
  // was an error (the coordinator refused this server), OK otherwise.
  absl::Status Wait();

  // Whether health checks answer SERVING: after joining the coordinator,
  // until shutdown.
  bool serving() const;

 private:
  TesseraServer() = default;
  // Registers with the coordinator, retrying with backoff until it answers;
  // a refusal (other job, bad shard) shuts the server down with an error.
  void JoinLoop(ServerOptions options, uint64_t job_hash);
  void SetServing(bool serving);

  absl::StatusOr<CheckpointResult> CheckpointNow();

  // Body of checkpoint_timer_.
  void CheckpointTimerLoop(absl::Duration period);

  std::unique_ptr<ShardStore> store_;
  std::unique_ptr<Checkpointer> checkpointer_;
  std::unique_ptr<MetricsEndpoint> metrics_;
  std::unique_ptr<ServiceMetrics> service_metrics_;
  absl::Duration checkpoint_timeout_;
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<ParameterServiceImpl> parameter_service_;
  std::unique_ptr<CoordinatorServiceImpl> coordinator_service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::thread joiner_;
  // Asks for a checkpoint every job.checkpoint.every_seconds until stopping_.
  std::thread checkpoint_timer_;
  absl::Notification stopping_;
  mutable absl::Mutex mu_;
  bool serving_ ABSL_GUARDED_BY(mu_) = false;
  bool shutdown_called_ ABSL_GUARDED_BY(mu_) = false;
  // Touched only by the thread that calls Wait().
  bool final_checkpoint_written_ = false;
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tessera

#endif  // TESSERA_SERVER_SERVER_H_
