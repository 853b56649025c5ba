// `tessera status`: the job at a glance from the coordinator and every
// shard.

#ifndef TESSERA_CLI_STATUS_H_
#define TESSERA_CLI_STATUS_H_

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <grpcpp/security/credentials.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/tessera.pb.h"

namespace tessera {

// What the coordinator and the shards said, at one moment.
struct StatusView {
  std::string coordinator;
  tessera::v1::JobStatusResponse job;
  // Indexed by shard; nullopt when the shard did not answer (or has not
  // registered).
  std::vector<std::optional<tessera::v1::ShardStatsResponse>> shards;
  std::vector<std::string> shard_addresses;
};

// Asks the coordinator at `address` for the job, then each registered shard
// for its stats. kUnavailable naming the address when the coordinator does
// not answer within `timeout`; silent shards are only marked.
absl::StatusOr<StatusView> FetchStatus(const std::string& address,
                                       std::shared_ptr<grpc::ChannelCredentials> credentials,
                                       absl::Duration timeout);

// Plain-text rendering: the job and its step, one line per shard (version,
// blocks, bytes, live workers, pushes, rejections, last checkpoint), one
// line per worker (alive, step, epoch, loss, lag behind the fastest).
std::string RenderStatus(const StatusView& view);

}  // namespace tessera

#endif  // TESSERA_CLI_STATUS_H_
