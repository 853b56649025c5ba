// ParameterClient over one long-lived gRPC stream per shard.

#ifndef TESSERA_WORKER_GRPC_PARAMETER_CLIENT_H_
#define TESSERA_WORKER_GRPC_PARAMETER_CLIENT_H_

#include <memory>
#include <string>
#include <vector>

#include <grpcpp/security/credentials.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/partition.h"
#include "common/socket_tuning.h"
#include "proto/tessera.pb.h"
#include "worker/parameter_client.h"

namespace tessera {

struct GrpcClientOptions {
  std::vector<std::string> servers;  // one address per shard, in shard order
  int worker_id = 0;
  int64_t incarnation = 0;
  uint64_t job_hash = 0;
  // Largest message the client accepts (a shard's parameters plus slack).
  int max_message_bytes = 64 << 20;
  // Pushes and pulled parameters on the stream (no shared memory) travel
  // in parts of whole blocks of at least this many payload bytes, so that
  // one end works on a part while the next is on its way
  // (PushRequest.more_parts, Hello.reply_part_bytes); 0: one message each.
  int64_t part_bytes = 4 << 20;
  // Element type of pushed gradients (F32 or BF16).
  tessera::v1::DType wire_dtype = tessera::v1::F32;
  // Top-k sparsified pushes with error feedback (JobSpec.top_k_fraction);
  // 0: dense.
  double top_k_fraction = 0;
  // Channel credentials (TLS, tokens); null means plaintext.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // How long to wait for each server to accept a connection.
  absl::Duration connect_timeout = absl::Seconds(60);
  // How long one request keeps retrying (reopening its stream with
  // exponential backoff) while a server is unreachable or restarting.
  absl::Duration retry_timeout = absl::Seconds(120);
  // Longest wait for the reply to one request on a stream (a synchronous
  // pull may wait for the step's barrier, so keep this above the job's
  // barrier timeout); an overdue request fails with DEADLINE_EXCEEDED and
  // is retried on a new stream.
  absl::Duration request_timeout = absl::Seconds(65);
  // TCP options of the streams' connections (retransmission-timeout floor).
  SocketTuning socket_tuning;
  // Offer each same-host server (loopback or Unix-socket address) a
  // shared-memory region for payloads (common/shared_region.h); a server
  // that cannot use it declines and payloads stay on the stream.
  bool shared_memory = true;
};

// Opens a stream to every shard and says Hello on each. Shards are served in
// parallel: each stream has its own thread, so a step costs the slowest
// shard's time, not the sum. A request that fails because its server is
// unreachable, restarting or stopping (UNAVAILABLE, CANCELLED, ABORTED, a
// broken stream) reopens the stream and is sent again, with exponential
// backoff, for up to retry_timeout; exactly-once apply on the servers makes
// the resend safe. Keepalive pings notice a silently dead server, and every
// request has its own deadline (request_timeout). kUnavailable naming the
// shard and address when a server cannot be reached; kFailedPrecondition
// when a server rejects the Hello (other job, wrong shard order).
absl::StatusOr<std::unique_ptr<ParameterClient>> CreateGrpcParameterClient(
    const Partition& partition, const GrpcClientOptions& options);

}  // namespace tessera

#endif  // TESSERA_WORKER_GRPC_PARAMETER_CLIENT_H_
