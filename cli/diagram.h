// `tessera diagram`: the cluster and its training loop as a Mermaid
// flowchart, drawn from a job file or from a running job's coordinator.

#ifndef TESSERA_CLI_DIAGRAM_H_
#define TESSERA_CLI_DIAGRAM_H_

#include <cstdint>
#include <optional>
#include <string>

#include <grpcpp/security/credentials.h>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/tessera.pb.h"

namespace tessera {

// One parameter server as a diagram shows it.
struct DiagramServer {
  int shard = 0;
  std::string address;  // empty when drawn from a job file
  // What the shard owns; unset when it could not be learned.
  std::optional<int64_t> num_blocks;
  std::optional<int64_t> param_bytes;
  // Live only: false when the server did not answer at its registered
  // address (the figures, if any, then come from the job's partition).
  bool answered = true;
};

// One worker as a diagram shows it.
struct DiagramWorker {
  int rank = 0;
  // Progress as the coordinator last heard it; unset when drawn from a job
  // file.
  std::optional<int64_t> step;
  int epoch = 0;
  bool alive = true;
};

// Everything a diagram shows. Plain data: build it with ClusterFromJob or
// ClusterFromCoordinator, or by hand in tests.
struct ClusterPicture {
  std::string job_name;
  std::string model;  // empty when unknown
  // The job's consistency policy; unset when no job file was given for a
  // live cluster (the coordinator does not report it).
  std::optional<tessera::v1::ConsistencySpec> consistency;
  int num_shards = 0;
  int num_workers = 0;
  // Where the picture came from: a job file's path or a coordinator's
  // address (shown in a comment line).
  std::string source;
  bool live = false;                   // servers and workers as registered, not as planned
  std::vector<DiagramServer> servers;  // by shard
  std::vector<DiagramWorker> workers;  // by rank
};

// The cluster a validated job plans: every shard with the blocks and bytes
// the job's partition gives it, every rank. Errors name the job's field.
absl::StatusOr<ClusterPicture> ClusterFromJob(const tessera::v1::JobSpec& job,
                                              const std::string& source);

// The running cluster as the coordinator at `address` (shard 0) reports it
// (JobStatus), with each registered server's blocks and bytes from its
// ShardStats rpc. `job`, when given, supplies the model and consistency
// mode, and must hash as the coordinator's job does (kFailedPrecondition
// otherwise). kUnavailable (naming the address) when the coordinator does
// not answer within `timeout`.
absl::StatusOr<ClusterPicture> ClusterFromCoordinator(const std::string& address,
                                                      const tessera::v1::JobSpec* job,
                                                      absl::Duration timeout,
    std::shared_ptr<grpc::ChannelCredentials> credentials);

// The picture as Mermaid flowchart text: servers (shard, address, blocks,
// bytes) with the coordinator on shard 0, and per worker the pull -> compute
// -> push loop with the consistency mode on its edges. Workers after the
// 16th are summarised in one node to keep large jobs readable.
std::string MermaidFlowchart(const ClusterPicture& picture);

// Text made safe inside a double-quoted Mermaid label: quotes, '#', '<',
// '>' and '`' become entity codes ("#34;"), line breaks spaces.
std::string MermaidLabelText(const std::string& text);

}  // namespace tessera

#endif  // TESSERA_CLI_DIAGRAM_H_
