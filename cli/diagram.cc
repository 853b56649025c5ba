#include "cli/diagram.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/grpc_status.h"
#include "common/job_spec.h"
#include "common/model_spec.h"
#include "common/partition.h"
#include "common/status_macros.h"
#include "proto/tessera.grpc.pb.h"
#include "worker/job_data.h"

namespace tessera {
namespace {

// Beyond this many workers one node stands for the rest: every worker runs
// the same loop, and a hundred copies of it hide the structure.
constexpr int kMaxDrawnWorkers = 16;

std::chrono::system_clock::time_point Deadline(absl::Duration timeout) {
  return std::chrono::system_clock::now() +
         std::chrono::microseconds(absl::ToInt64Microseconds(timeout));
}

// "1.2 MiB (1258291 bytes)": the exact figure for checking, the rounded one
// for people.
std::string Bytes(int64_t bytes) {
  if (bytes < 1024) return absl::StrCat(bytes, " bytes");
  const double kib = bytes / 1024.0;
  const std::string rounded =
      kib < 1024 ? absl::StrFormat("%.1f KiB", kib) : absl::StrFormat("%.1f MiB", kib / 1024.0);
  return absl::StrCat(rounded, " (", bytes, " bytes)");
}

// The rule a worker's loop follows between push and the next pull.
std::string LoopRule(const ClusterPicture& p) {
  if (!p.consistency.has_value()) return "consistency mode unknown: pass --job";
  switch (p.consistency->mode()) {
    case tessera::v1::SYNC:
      if (p.consistency->backup_workers() > 0) {
        return absl::StrCat("sync barrier: step t+1 waits for the first ",
                            p.num_workers - p.consistency->backup_workers(), " of ", p.num_workers,
                            " workers' step t; later ones are dropped");
      }
      return absl::StrCat("sync barrier: step t+1 waits for all ", p.num_workers,
                          " workers' step t");
    case tessera::v1::ASYNC:
      return "async: applied on arrival, no waiting";
    case tessera::v1::SSP:
      return absl::StrCat("ssp staleness ", p.consistency->staleness(), ": wait while more than ",
                          p.consistency->staleness(), " steps ahead of the slowest");
    default:
      return "consistency mode unspecified";
  }
}

std::string ModeTitle(const ClusterPicture& p) {
  if (!p.consistency.has_value()) return "mode unknown";
  if (p.consistency->mode() == tessera::v1::SSP) {
    return absl::StrCat("ssp, staleness ", p.consistency->staleness());
  }
  return ModeName(p.consistency->mode());
}

std::string ServerLabel(const DiagramServer& s) {
  std::string label = absl::StrCat("shard ", s.shard);
  if (!s.address.empty()) {
    absl::StrAppend(&label, "<br/>", MermaidLabelText(s.address), s.answered ? "" : " (no answer)");
  }
  if (s.num_blocks.has_value()) {
    absl::StrAppend(&label, "<br/>", *s.num_blocks, *s.num_blocks == 1 ? " block" : " blocks");
  }
  if (s.param_bytes.has_value()) absl::StrAppend(&label, "<br/>", Bytes(*s.param_bytes));
  return label;
}

std::string WorkerTitle(const DiagramWorker& w) {
  std::string title = absl::StrCat("worker rank ", w.rank);
  if (w.step.has_value()) {
    absl::StrAppend(&title, " - step ", *w.step, ", epoch ", w.epoch);
    if (!w.alive) absl::StrAppend(&title, " - not heard from");
  }
  return title;
}

}  // namespace

std::string MermaidLabelText(const std::string& text) {
  std::string out;
  for (char c : text) {
    switch (c) {
      case '"':
        out += "#34;";
        break;
      case '#':
        out += "#35;";
        break;
      case '<':
        out += "#60;";
        break;
      case '>':
        out += "#62;";
        break;
      case '`':
        out += "#96;";
        break;
      case '\n':
      case '\r':
        out += ' ';
        break;
      default:
        out += c;
    }
  }
  return out;
}

absl::StatusOr<ClusterPicture> ClusterFromJob(const tessera::v1::JobSpec& job,
                                              const std::string& source) {
  TESSERA_ASSIGN_OR_RETURN(ModelSpec model, ParseModelSpec(job.model(), JobLoss(job)));
  TESSERA_ASSIGN_OR_RETURN(Partition partition,
                           Partition::Create(model, job.num_shards(), job.block_bytes()));
  ClusterPicture p;
  p.job_name = job.name();
  p.model = job.model();
  p.consistency = job.consistency();
  p.num_shards = job.num_shards();
  p.num_workers = job.num_workers();
  p.source = source;
  for (int s = 0; s < job.num_shards(); ++s) {
    DiagramServer server;
    server.shard = s;
    if (s < job.server_addresses_size()) server.address = job.server_addresses(s);
    server.num_blocks = static_cast<int64_t>(partition.shard_blocks(s).size());
    server.param_bytes = partition.shard_bytes(s);
    p.servers.push_back(server);
  }
  for (int r = 0; r < job.num_workers(); ++r) {
    DiagramWorker w;
    w.rank = r;
    p.workers.push_back(w);
  }
  return p;
}

absl::StatusOr<ClusterPicture> ClusterFromCoordinator(const std::string& address,
                                                      const tessera::v1::JobSpec* job,
                                                      absl::Duration timeout,
                                                      std::shared_ptr<grpc::ChannelCredentials> credentials) {
  auto channel = grpc::CreateChannel(address, credentials);
  auto stub = tessera::v1::CoordinatorService::NewStub(channel);
  tessera::v1::JobStatusResponse status;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(Deadline(timeout));
    absl::Status s =
        FromGrpcStatus(stub->JobStatus(&ctx, tessera::v1::JobStatusRequest(), &status));
    if (!s.ok()) return Annotate(s, absl::StrCat("job status from ", address));
  }
  ClusterPicture p;
  p.job_name = status.job_name();
  p.num_shards = status.num_shards();
  p.num_workers = status.num_workers();
  p.source = address;
  p.live = true;
  std::optional<Partition> partition;
  if (job != nullptr) {
    if (JobHash(*job) != status.job_hash()) {
      return absl::FailedPreconditionError(
          absl::StrCat("--job: the job file hashes to ", JobHash(*job), " but the coordinator at ",
                       address, " runs job '", status.job_name(), "' with hash ", status.job_hash(),
                       " (same file and overrides?)"));
    }
    p.model = job->model();
    p.consistency = job->consistency();
    TESSERA_ASSIGN_OR_RETURN(ModelSpec model, ParseModelSpec(job->model(), JobLoss(*job)));
    TESSERA_ASSIGN_OR_RETURN(partition,
                             Partition::Create(model, job->num_shards(), job->block_bytes()));
  }
  for (const tessera::v1::ServerStatus& registered : status.servers()) {
    DiagramServer server;
    server.shard = registered.shard();
    server.address = registered.address();
    // What the shard itself reports is what it holds now; the partition
    // is the fallback when a server does not answer. Shard 0 may have
    // registered an address that is not reachable from here (its listen
    // address, port 0 when the port was chosen by the system), but it also
    // hosts the coordinator that just answered.
    std::vector<std::string> candidates = {registered.address()};
    if (server.shard == 0 && registered.address() != address) candidates.push_back(address);
    for (const std::string& candidate : candidates) {
      auto shard_stub = tessera::v1::ParameterService::NewStub(
          grpc::CreateChannel(candidate, credentials));
      grpc::ClientContext ctx;
      ctx.set_deadline(Deadline(timeout));
      tessera::v1::ShardStatsResponse stats;
      if (shard_stub->ShardStats(&ctx, tessera::v1::ShardStatsRequest(), &stats).ok() &&
          stats.shard() == server.shard) {
        server.address = candidate;
        server.num_blocks = stats.num_blocks();
        server.param_bytes = stats.param_bytes();
        break;
      }
    }
    server.answered = server.param_bytes.has_value();
    if (!server.param_bytes.has_value() && partition.has_value() &&
        server.shard < partition->num_shards()) {
      server.num_blocks = static_cast<int64_t>(partition->shard_blocks(server.shard).size());
      server.param_bytes = partition->shard_bytes(server.shard);
    }
    p.servers.push_back(server);
  }
  for (const tessera::v1::WorkerStatus& w : status.workers()) {
    p.workers.push_back(
        {.rank = w.worker_id(), .step = w.step(), .epoch = w.epoch(), .alive = w.alive()});
  }
  return p;
}

std::string MermaidFlowchart(const ClusterPicture& p) {
  std::string out;
  // Comments first: Mermaid ignores "%%" lines, people read them.
  absl::StrAppend(&out, "%% Tessera job '", MermaidLabelText(p.job_name), "'",
                  p.model.empty() ? "" : absl::StrCat(", ", MermaidLabelText(p.model)), ", ",
                  ModeTitle(p), "; ", p.live ? "live from " : "planned by ",
                  MermaidLabelText(p.source), "\n");
  out += "flowchart LR\n";

  // Servers, with the coordinator on shard 0.
  int64_t total_bytes = 0;
  bool bytes_known = true;
  for (const DiagramServer& s : p.servers) {
    if (s.param_bytes.has_value()) {
      total_bytes += *s.param_bytes;
    } else {
      bytes_known = false;
    }
  }
  std::string servers_title = absl::StrCat("parameter servers: ");
  if (p.live) absl::StrAppend(&servers_title, p.servers.size(), " of ");
  absl::StrAppend(&servers_title, p.num_shards, p.num_shards == 1 ? " shard" : " shards",
                  p.live ? " registered" : "");
  if (bytes_known && !p.servers.empty()) {
    absl::StrAppend(&servers_title, ", ", Bytes(total_bytes));
  }
  absl::StrAppend(&out, "  subgraph servers[\"", servers_title, "\"]\n");
  out += "    direction TB\n";
  out += "    coordinator{{\"coordinator<br/>membership, barriers, job status\"}}\n";
  for (const DiagramServer& s : p.servers) {
    absl::StrAppend(&out, "    shard", s.shard, "[(\"", ServerLabel(s), "\")]\n");
  }
  out += "  end\n";
  bool shard0_drawn = false;
  for (const DiagramServer& s : p.servers) {
    if (s.shard == 0) {
      shard0_drawn = true;
      out += "  shard0 --- |\"hosts\"| coordinator\n";
    } else {
      absl::StrAppend(&out, "  shard", s.shard, " -. \"joins\" .-> coordinator\n");
    }
  }
  if (!shard0_drawn) out += "  %% shard 0 has not registered: the coordinator runs there\n";

  // Workers: each one's pull -> compute -> push loop.
  const std::string rule = MermaidLabelText(LoopRule(p));
  std::string workers_title = absl::StrCat("workers: ");
  if (p.live) absl::StrAppend(&workers_title, p.workers.size(), " of ");
  absl::StrAppend(&workers_title, p.num_workers, p.live ? " registered" : "", ", ", ModeTitle(p));
  absl::StrAppend(&out, "  subgraph workers[\"", workers_title, "\"]\n");
  out += "    direction TB\n";
  const size_t drawn = std::min<size_t>(p.workers.size(), kMaxDrawnWorkers);
  for (size_t i = 0; i < drawn; ++i) {
    const DiagramWorker& w = p.workers[i];
    const std::string id = absl::StrCat("w", w.rank);
    absl::StrAppend(&out, "    subgraph ", id, "[\"", WorkerTitle(w), "\"]\n");
    out += "      direction LR\n";
    absl::StrAppend(&out, "      ", id, "_pull[\"pull parameters\"] --> ", id,
                    "_compute[\"compute gradients<br/>on its slice of the batch\"] --> ", id,
                    "_push[\"push gradients\"]\n");
    absl::StrAppend(&out, "      ", id, "_push -- \"", rule, "\" --> ", id, "_pull\n");
    out += "    end\n";
  }
  if (p.workers.size() > drawn) {
    absl::StrAppend(&out, "    others[\"ranks ", p.workers[drawn].rank, " to ",
                    p.workers.back().rank, "<br/>", p.workers.size() - drawn,
                    " more workers, same loop\"]\n");
  }
  out += "  end\n";
  for (size_t i = 0; i < drawn; ++i) {
    const std::string id = absl::StrCat("w", p.workers[i].rank);
    absl::StrAppend(&out, "  ", id, "_push == \"gradients, one stream per shard\" ==> servers\n");
    absl::StrAppend(&out, "  servers == \"parameters\" ==> ", id, "_pull\n");
    absl::StrAppend(&out, "  ", id, " -. \"register, heartbeat\" .-> coordinator\n");
  }
  if (p.workers.size() > drawn) {
    out += "  others == \"gradients\" ==> servers\n";
    out += "  servers == \"parameters\" ==> others\n";
  }

  out += "  classDef server fill:#e8f0fe,stroke:#3367d6\n";
  out += "  classDef coord fill:#fef7e0,stroke:#f9ab00\n";
  out += "  classDef gone fill:#fce8e6,stroke:#d93025\n";
  for (const DiagramServer& s : p.servers)
    absl::StrAppend(&out, "  class shard", s.shard, " server\n");
  out += "  class coordinator coord\n";
  for (size_t i = 0; i < drawn; ++i) {
    if (!p.workers[i].alive) absl::StrAppend(&out, "  class w", p.workers[i].rank, " gone\n");
  }
  return out;
}

}  // namespace tessera
