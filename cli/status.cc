#include "cli/status.h"

#include <algorithm>
#include <chrono>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/grpc_status.h"
#include "common/status_macros.h"
#include "proto/tessera.grpc.pb.h"

namespace tessera {
namespace {

std::chrono::system_clock::time_point Deadline(absl::Duration timeout) {
  return std::chrono::system_clock::now() + absl::ToChronoMilliseconds(timeout);
}

std::optional<tessera::v1::ShardStatsResponse> AskShard(
    const std::string& address, const std::shared_ptr<grpc::ChannelCredentials>& credentials,
    absl::Duration timeout) {
  auto stub =
      tessera::v1::ParameterService::NewStub(grpc::CreateChannel(address, credentials));
  grpc::ClientContext ctx;
  ctx.set_deadline(Deadline(timeout));
  tessera::v1::ShardStatsResponse stats;
  if (!stub->ShardStats(&ctx, tessera::v1::ShardStatsRequest(), &stats).ok()) {
    return std::nullopt;
  }
  return stats;
}

}  // namespace

absl::StatusOr<StatusView> FetchStatus(const std::string& address,
                                       std::shared_ptr<grpc::ChannelCredentials> credentials,
                                       absl::Duration timeout) {
  StatusView view;
  view.coordinator = address;
  auto stub = tessera::v1::CoordinatorService::NewStub(grpc::CreateChannel(address, credentials));
  grpc::ClientContext ctx;
  ctx.set_deadline(Deadline(timeout));
  absl::Status s = FromGrpcStatus(
      stub->JobStatus(&ctx, tessera::v1::JobStatusRequest(), &view.job));
  if (!s.ok()) return Annotate(s, absl::StrCat("status from ", address));
  view.shards.resize(view.job.num_shards());
  view.shard_addresses.resize(view.job.num_shards());
  for (const tessera::v1::ServerStatus& server : view.job.servers()) {
    if (server.shard() < 0 || server.shard() >= view.job.num_shards()) continue;
    view.shard_addresses[server.shard()] = server.address();
    auto stats = AskShard(server.address(), credentials, timeout);
    // Shard 0 also answers at the coordinator's address, which is known to
    // be reachable from here.
    if (!stats.has_value() && server.shard() == 0 && server.address() != address) {
      stats = AskShard(address, credentials, timeout);
      if (stats.has_value()) view.shard_addresses[0] = address;
    }
    if (stats.has_value() && stats->shard() == server.shard()) view.shards[server.shard()] = stats;
  }
  return view;
}

std::string RenderStatus(const StatusView& view) {
  const tessera::v1::JobStatusResponse& job = view.job;
  int64_t fastest = 0;
  int alive = 0;
  int epoch = 0;
  for (const auto& w : job.workers()) {
    fastest = std::max(fastest, w.step());
    alive += w.alive() ? 1 : 0;
    epoch = std::max(epoch, w.epoch());
  }
  std::string out = absl::StrFormat(
      "job '%s' at %s: step %d, epoch %d; %d/%d servers, %d/%d workers alive\n\n",
      job.job_name(), view.coordinator, fastest, epoch + 1, job.servers_size(), job.num_shards(),
      alive, job.num_workers());
  absl::StrAppendFormat(&out, "%-6s %-22s %-8s %-7s %-9s %-5s %-9s %-7s %-9s %s\n", "shard",
                        "address", "version", "blocks", "MiB", "live", "pushes", "late", "rejected",
                        "last checkpoint");
  for (size_t i = 0; i < view.shards.size(); ++i) {
    const std::string& address =
        view.shard_addresses[i].empty() ? "(not registered)" : view.shard_addresses[i];
    if (!view.shards[i].has_value()) {
      absl::StrAppendFormat(&out, "%-6d %-22s %s\n", i, address, "(no answer)");
      continue;
    }
    const tessera::v1::ShardStatsResponse& s = *view.shards[i];
    const std::string checkpoint = s.last_checkpoint_step() < 0
                                       ? "none"
                                       : absl::StrCat("step ", s.last_checkpoint_step());
    absl::StrAppendFormat(&out, "%-6d %-22s %-8d %-7d %-9.2f %-5d %-9d %-7d %-9d %s\n", i, address,
                          s.version(), s.num_blocks(), s.param_bytes() / 1048576.0,
                          s.live_workers(), s.pushes_applied(), s.pushes_late(),
                          s.requests_rejected(), checkpoint);
  }
  absl::StrAppendFormat(&out, "\n%-7s %-6s %-8s %-6s %-9s %-5s %s\n", "worker", "alive", "step",
                        "epoch", "loss", "lag", "last seen");
  for (const auto& w : job.workers()) {
    absl::StrAppendFormat(&out, "%-7d %-6s %-8d %-6d %-9.4f %-5d %.1fs ago\n", w.worker_id(),
                          w.alive() ? "yes" : "no", w.step(), w.epoch() + 1, w.loss(),
                          fastest - w.step(), w.last_seen_ms() / 1000.0);
  }
  return out;
}

}  // namespace tessera
