// gRPC adapters: turn stream messages and unary calls into calls on the
// ShardStore and Coordinator, and statuses back into wire codes.

#ifndef TESSERA_SERVER_PARAMETER_SERVICE_H_
#define TESSERA_SERVER_PARAMETER_SERVICE_H_

#include <cstdint>

#include "absl/time/time.h"
#include "proto/tessera.grpc.pb.h"
#include <atomic>
#include <functional>
#include <optional>

#include "server/checkpointer.h"
#include "server/coordinator.h"
#include "server/server_metrics.h"
#include "server/shard_store.h"

namespace tessera {

// Serves one shard's ParameterService. Each Session stream occupies one
// thread of the synchronous server for its lifetime, which may block while
// a synchronous step waits for the other workers (bounded by
// `pull_timeout`). Thread-safe; does not own `store`.
class ParameterServiceImpl final
    : public tessera::v1::ParameterService::Service {
 public:
  // `checkpoint` serves the Checkpoint rpc (writes one and says where).
  // `metrics` may be null. At most `max_sessions` streams are served at
  // once; more are refused with RESOURCE_EXHAUSTED.
  ParameterServiceImpl(ShardStore* store, uint64_t job_hash, absl::Duration pull_timeout,
                       std::function<absl::StatusOr<CheckpointResult>()> checkpoint,
                       ServiceMetrics* metrics, int max_sessions,
                       std::function<std::optional<CheckpointResult>()> last_checkpoint);

  // Whether Hellos that name a same-host shared-memory region may use it
  // (common/shared_region.h); on by default. Call before serving.
  void AllowSharedMemory(bool allow) { allow_shared_memory_ = allow; }

  grpc::Status Session(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<tessera::v1::ServerMessage,
                               tessera::v1::ClientMessage>* stream) override;

  grpc::Status ShardStats(grpc::ServerContext* context,
                          const tessera::v1::ShardStatsRequest* request,
                          tessera::v1::ShardStatsResponse* response) override;

  grpc::Status Checkpoint(grpc::ServerContext* context,
                          const tessera::v1::CheckpointRequest* request,
                          tessera::v1::CheckpointResponse* response) override;

 private:
  // Answers a pull for `step` into `reply` (an error code on failure).
  // Payloads go into `area` (the stream's shared-memory reply area) when
  // it is not empty.
  void Pull(int64_t step, absl::Span<char> area, tessera::v1::ServerMessage* reply);

  const int max_sessions_;
  std::atomic<int> sessions_{0};
  // Constant after construction.
  ShardStore* const store_;
  const uint64_t job_hash_;
  const absl::Duration pull_timeout_;
  const std::function<absl::StatusOr<CheckpointResult>()> checkpoint_;
  const std::function<std::optional<CheckpointResult>()> last_checkpoint_;
  ServiceMetrics* const metrics_;
  bool allow_shared_memory_ = true;
};

// Serves the CoordinatorService. Thread-safe; does not own `coordinator`.
class CoordinatorServiceImpl final
    : public tessera::v1::CoordinatorService::Service {
 public:
  explicit CoordinatorServiceImpl(Coordinator* coordinator)
      : coordinator_(coordinator) {}

  grpc::Status RegisterServer(grpc::ServerContext* context,
                              const tessera::v1::RegisterServerRequest* request,
                              tessera::v1::RegisterServerResponse* response) override;
  grpc::Status Register(grpc::ServerContext* context,
                        const tessera::v1::RegisterRequest* request,
                        tessera::v1::RegisterResponse* response) override;
  grpc::Status Heartbeat(grpc::ServerContext* context,
                         const tessera::v1::HeartbeatRequest* request,
                         tessera::v1::HeartbeatResponse* response) override;
  grpc::Status JobStatus(grpc::ServerContext* context,
                         const tessera::v1::JobStatusRequest* request,
                         tessera::v1::JobStatusResponse* response) override;

 private:
  Coordinator* const coordinator_;
};

}  // namespace tessera

#endif  // TESSERA_SERVER_PARAMETER_SERVICE_H_
