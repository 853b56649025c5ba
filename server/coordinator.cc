#include "server/coordinator.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace tessera {
namespace {
// A worker unheard of for this long is reported as not alive.
constexpr absl::Duration kAliveWindow = absl::Seconds(10);
}  // namespace

Coordinator::Coordinator(const tessera::v1::JobSpec& job, uint64_t job_hash)
    : job_name_(job.name()),
      job_hash_(job_hash),
      num_shards_(job.num_shards()),
      members_(job.num_workers()),
      servers_(job.num_shards()) {}

absl::Status Coordinator::RegisterServer(int shard, uint64_t job_hash,
                                         const std::string& address) {
  absl::MutexLock lock(&mu_);
  if (shard < 0 || shard >= static_cast<int>(servers_.size())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "server shard ", shard, " out of range [0, ", servers_.size(), ")"));
  }
  if (job_hash != job_hash_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "server for shard ", shard, " runs a different job (hash ", job_hash,
        ", coordinator has ", job_hash_, "): check the job file and overrides"));
  }
  servers_[shard] = {true, address, absl::Now()};
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Coordinator::Register(int worker, uint64_t job_hash) {
  absl::MutexLock lock(&mu_);
  if (worker < 0 || worker >= static_cast<int>(members_.size())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "worker id ", worker, " out of range [0, ", members_.size(), ")"));
  }
  if (job_hash != job_hash_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "worker ", worker, " runs a different job (hash ", job_hash,
        ", coordinator has ", job_hash_, "): check the job file and overrides"));
  }
  const absl::Time now = absl::Now();
  last_incarnation_ = std::max(last_incarnation_ + 1, absl::ToUnixMicros(now));
  Member& m = members_[worker];
  m.registered = true;
  m.incarnation = last_incarnation_;
  m.last_seen = now;
  return m.incarnation;
}

absl::StatusOr<tessera::v1::HeartbeatResponse> Coordinator::Heartbeat(
    const tessera::v1::HeartbeatRequest& request) {
  absl::MutexLock lock(&mu_);
  const int worker = request.worker_id();
  if (worker < 0 || worker >= static_cast<int>(members_.size()) ||
      !members_[worker].registered) {
    return absl::FailedPreconditionError(
        absl::StrCat("heartbeat from unregistered worker ", worker));
  }
  Member& m = members_[worker];
  if (request.incarnation() != m.incarnation) {
    return absl::FailedPreconditionError(
        absl::StrCat("heartbeat from worker ", worker, " incarnation ",
                     request.incarnation(), ", current is ", m.incarnation));
  }
  m.step = request.step();
  m.epoch = request.epoch();
  m.loss = request.loss();
  m.last_seen = absl::Now();
  return tessera::v1::HeartbeatResponse();
}

tessera::v1::JobStatusResponse Coordinator::Status() const {
  tessera::v1::JobStatusResponse out;
  out.set_job_name(job_name_);
  out.set_job_hash(job_hash_);
  out.set_num_shards(num_shards_);
  const absl::Time now = absl::Now();
  absl::MutexLock lock(&mu_);
  out.set_num_workers(static_cast<int>(members_.size()));
  for (int i = 0; i < static_cast<int>(servers_.size()); ++i) {
    if (!servers_[i].registered) continue;
    tessera::v1::ServerStatus* s = out.add_servers();
    s->set_shard(i);
    s->set_address(servers_[i].address);
    s->set_registered_ms_ago(absl::ToInt64Milliseconds(now - servers_[i].since));
  }
  for (int i = 0; i < static_cast<int>(members_.size()); ++i) {
    const Member& m = members_[i];
    if (!m.registered) continue;
    tessera::v1::WorkerStatus* w = out.add_workers();
    w->set_worker_id(i);
    w->set_incarnation(m.incarnation);
    w->set_step(m.step);
    w->set_epoch(m.epoch);
    w->set_loss(m.loss);
    w->set_last_seen_ms(absl::ToInt64Milliseconds(now - m.last_seen));
    w->set_alive(now - m.last_seen < kAliveWindow);
  }
  return out;
}

}  // namespace tessera
