// Membership and job status for a job: incarnations, heartbeats, progress.
// Hosted by shard 0. Transport-free.

#ifndef TESSERA_SERVER_COORDINATOR_H_
#define TESSERA_SERVER_COORDINATOR_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/tessera.pb.h"

namespace tessera {

// Tracks which workers have joined, their incarnations and progress.
// Thread-safe.
class Coordinator {
 public:
  // `job` must be validated; `job_hash` is JobHash(job).
  Coordinator(const tessera::v1::JobSpec& job, uint64_t job_hash);

  // Admits worker `worker` and returns its new incarnation: larger than any
  // earlier one for that rank, also across coordinator restarts (it is
  // derived from the wall clock). kInvalidArgument for a bad rank,
  // kFailedPrecondition when the worker's job file differs.
  absl::StatusOr<int64_t> Register(int worker, uint64_t job_hash);

  // A server for `shard` is up at `address`. kInvalidArgument for a bad
  // shard, kFailedPrecondition when its job file differs.
  absl::Status RegisterServer(int shard, uint64_t job_hash, const std::string& address);

  // Records liveness and progress. kFailedPrecondition for an unknown or
  // replaced incarnation.
  absl::StatusOr<tessera::v1::HeartbeatResponse> Heartbeat(
      const tessera::v1::HeartbeatRequest& request);

  tessera::v1::JobStatusResponse Status() const;

 private:
  struct Member {
    bool registered = false;
    int64_t incarnation = 0;
    int64_t step = 0;
    int32_t epoch = 0;
    double loss = 0;
    absl::Time last_seen;
  };

  struct ServerEntry {
    bool registered = false;
    std::string address;
    absl::Time since;
  };

  // Constant after construction.
  const std::string job_name_;
  const uint64_t job_hash_;
  const int num_shards_;

  mutable absl::Mutex mu_;
  std::vector<Member> members_ ABSL_GUARDED_BY(mu_);
  std::vector<ServerEntry> servers_ ABSL_GUARDED_BY(mu_);
  int64_t last_incarnation_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace tessera

#endif  // TESSERA_SERVER_COORDINATOR_H_
