#include "server/parameter_service.h"

#include <iostream>
#include <string>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "common/credentials.h"
#include "common/grpc_status.h"
#include "common/protocol.h"
#include "common/shared_region.h"
#include "server/push_parts.h"

namespace tessera {
namespace {

using tessera::v1::ClientMessage;
using tessera::v1::ServerMessage;

void SetError(const absl::Status& status, ServerMessage* reply) {
  reply->set_code(static_cast<int>(status.code()));
  reply->set_message(std::string(status.message()));
}

double PayloadBytes(absl::Span<const absl::string_view> payloads) {
  double bytes = 0;
  for (absl::string_view p : payloads) bytes += p.size();
  return bytes;
}

double PayloadBytes(const google::protobuf::RepeatedPtrField<tessera::v1::TensorBlock>& blocks) {
  double bytes = 0;
  for (const tessera::v1::TensorBlock& b : blocks) bytes += b.data().size() + b.shm_size();
  return bytes;
}

// Writes `reply`; one carrying parameters goes in parts of whole blocks of
// at least `part_bytes` payload bytes (PullResult.more_parts) when
// part_bytes > 0 and it is larger. `part` is reused working space; the
// blocks' buffers go back to `reply` after each part, so both keep their
// capacity. False when the stream is broken.
bool WriteReply(grpc::ServerReaderWriter<ServerMessage, ClientMessage>* stream,
                ServerMessage* reply, int64_t part_bytes, ServerMessage* part) {
  const int n = reply->has_pull() ? reply->pull().blocks_size() : 0;
  int64_t total = 0;
  for (int i = 0; i < n; ++i) total += static_cast<int64_t>(reply->pull().blocks(i).data().size());
  if (part_bytes <= 0 || reply->code() != 0 || total <= part_bytes) return stream->Write(*reply);
  part->set_request_id(reply->request_id());
  part->set_code(0);
  part->clear_message();
  if (reply->has_push()) {
    *part->mutable_push() = reply->push();
  } else {
    part->clear_push();
  }
  part->mutable_pull()->set_version(reply->pull().version());
  auto* from = reply->mutable_pull()->mutable_blocks();
  auto* to = part->mutable_pull()->mutable_blocks();
  to->Clear();
  int first = 0;
  int64_t bytes = 0;
  for (int i = 0; i < n; ++i) {
    tessera::v1::TensorBlock& b = (*from)[i];
    tessera::v1::TensorBlock* out = to->Add();
    out->set_block_id(b.block_id());
    out->set_dtype(b.dtype());
    out->mutable_data()->swap(*b.mutable_data());
    bytes += static_cast<int64_t>(out->data().size());
    const bool last = i + 1 == n;
    if (!last && bytes < part_bytes) continue;
    part->mutable_pull()->set_more_parts(!last);
    const bool ok = stream->Write(*part);
    for (int j = 0; j < to->size(); ++j) {
      (*from)[first + j].mutable_data()->swap(*(*to)[j].mutable_data());
    }
    to->Clear();
    first = i + 1;
    bytes = 0;
    if (!ok) return false;
  }
  return true;
}

}  // namespace

ParameterServiceImpl::ParameterServiceImpl(
    ShardStore* store, uint64_t job_hash, absl::Duration pull_timeout,
    std::function<absl::StatusOr<CheckpointResult>()> checkpoint, ServiceMetrics* metrics,
    int max_sessions, std::function<std::optional<CheckpointResult>()> last_checkpoint)
    : max_sessions_(max_sessions),
      store_(store),
      job_hash_(job_hash),
      pull_timeout_(pull_timeout),
      checkpoint_(std::move(checkpoint)),
      last_checkpoint_(std::move(last_checkpoint)),
      metrics_(metrics) {}

grpc::Status ParameterServiceImpl::Checkpoint(grpc::ServerContext* context,
                                              const tessera::v1::CheckpointRequest* request,
                                              tessera::v1::CheckpointResponse* response) {
  if (!IsAdminCall(*context)) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        "checkpoint needs the admin token (--admin_token_file)");
  }
  absl::StatusOr<CheckpointResult> r = checkpoint_();
  if (!r.ok()) return ToGrpcStatus(r.status());
  response->set_step(r->step);
  response->set_path(r->path);
  return grpc::Status::OK;
}

grpc::Status ParameterServiceImpl::Session(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<ServerMessage, ClientMessage>* stream) {
  // Each session holds a server thread for its lifetime; past the limit,
  // shed new ones at once instead of letting threads and memory grow.
  if (sessions_.fetch_add(1) >= max_sessions_) {
    sessions_.fetch_sub(1);
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        absl::StrCat("shard ", store_->shard(), " already has ", max_sessions_,
                                     " sessions open; try again later"));
  }
  absl::Cleanup release = [this] { sessions_.fetch_sub(1); };
  ClientMessage request;
  if (!stream->Read(&request)) return grpc::Status::OK;
  if (KindOf(request) != RequestKind::kHello) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "the first message on a Session must be a Hello (and only a Hello)");
  }
  const tessera::v1::Hello hello = request.hello();
  if (hello.protocol_version() != kSessionProtocolVersion) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        absl::StrCat("worker ", hello.worker_id(), " speaks session protocol ",
                                     hello.protocol_version(), " but shard ", store_->shard(),
                                     " speaks ", kSessionProtocolVersion,
                                     ": run the same Tessera release on every server and worker"));
  }
  if (hello.job_hash() != job_hash_) {
    return grpc::Status(
        grpc::StatusCode::FAILED_PRECONDITION,
        absl::StrCat("worker ", hello.worker_id(), " runs a different job (hash ",
                     hello.job_hash(), ", shard ", store_->shard(), " has ",
                     job_hash_, "): check the job file and overrides"));
  }
  if (hello.shard() != store_->shard()) {
    return grpc::Status(
        grpc::StatusCode::FAILED_PRECONDITION,
        absl::StrCat("worker addressed shard ", hello.shard(),
                     " but this server is shard ", store_->shard(),
                     ": check the order of --servers"));
  }
  absl::Status joined = store_->Connect(hello.worker_id(), hello.incarnation());
  if (!joined.ok()) return ToGrpcStatus(joined);
  const int worker = hello.worker_id();
  const int64_t incarnation = hello.incarnation();

  // Same-host fast path: map the worker's region when it names one.
  std::unique_ptr<SharedRegion> region;
  std::string shm_detail;
  if (!hello.shm_name().empty()) {
    // Room for a dense F32 push and pull of this shard, as the worker sizes it.
    const uint64_t max_bytes =
        SharedRegionBytes(store_->partition().shard_bytes(store_->shard()),
                          store_->partition().shard_blocks(store_->shard()).size());
    if (!allow_shared_memory_) {
      shm_detail = "shared memory is off on this server (--noshared_memory)";
    } else if (!IsLocalPeer(context->peer())) {
      shm_detail = absl::StrCat("the peer ", context->peer(), " is not on this host");
    } else {
      absl::StatusOr<std::unique_ptr<SharedRegion>> r = SharedRegion::Open(
          hello.shm_name(), hello.shm_size(), hello.shm_nonce(), max_bytes);
      if (r.ok()) {
        region = *std::move(r);
      } else {
        shm_detail = std::string(r.status().message());
      }
    }
  }
  const absl::Span<const char> request_area =
      region != nullptr ? region->request_area() : absl::Span<const char>();
  const absl::Span<char> reply_area =
      region != nullptr ? region->reply_area() : absl::Span<char>();
  std::vector<absl::string_view> payloads;  // of the push being handled
  // Parameters on the stream go in parts when the worker asked for them.
  const int64_t reply_part_bytes = region == nullptr ? hello.reply_part_bytes() : 0;
  ServerMessage reply_part;
  // Pushes in parts: at most every block of the shard, each at most F32
  // dense plus its indices (the store checks the exact sizes).
  PushPartGatherer parts(
      static_cast<int>(store_->partition().shard_blocks(store_->shard()).size()),
      2 * store_->partition().shard_bytes(store_->shard()) + (int64_t{1} << 20));

  // Messages are reused for the life of the stream so that their byte
  // buffers keep their capacity from one step to the next.
  ServerMessage reply;
  reply.set_request_id(request.request_id());
  reply.set_worker_clock(store_->WorkerClock(worker));
  reply.set_shm_accepted(region != nullptr);
  reply.set_shm_detail(shm_detail);
  reply.set_protocol_version(kSessionProtocolVersion);
  bool ok = stream->Write(reply);
  reply.clear_protocol_version();
  reply.clear_worker_clock();
  reply.clear_shm_accepted();
  reply.clear_shm_detail();
  while (ok && stream->Read(&request)) {
    reply.set_request_id(request.request_id());
    reply.set_code(0);
    reply.clear_message();
    reply.clear_push();
    // A push sent in parts is handled once, when its last part is in.
    const ClientMessage* r = nullptr;
    absl::Status refused;
    switch (parts.Offer(&request, &r, &refused)) {
      case PushPartGatherer::Action::kWait:
      case PushPartGatherer::Action::kDrop:
        continue;
      case PushPartGatherer::Action::kRefuse:
        store_->CountRejected();
        reply.clear_pull();
        SetError(refused, &reply);
        ok = stream->Write(reply);
        continue;
      case PushPartGatherer::Action::kHandle:
        break;
    }
    const ClientMessage& req = *r;
    // A push's payloads are read where they lie (inline or in the region,
    // without a copy); a bad range is refused like any bad block.
    const absl::Status resolved =
        req.has_push() ? ResolvePayloads(req.push().blocks(), request_area, &payloads)
                       : absl::OkStatus();
    switch (resolved.ok() ? KindOf(req) : RequestKind::kNone) {
      case RequestKind::kPush: {
        const absl::Time start = absl::Now();
        absl::StatusOr<PushOutcome> outcome =
            store_->Push(worker, incarnation, req.push(), payloads);
        if (metrics_ != nullptr) {
          using Outcome = ServiceMetrics::Outcome;
          metrics_->Push(!outcome.ok()      ? Outcome::kRejected
                         : outcome->applied ? Outcome::kApplied
                         : outcome->late    ? Outcome::kLate
                                            : Outcome::kDuplicate,
                         absl::ToDoubleSeconds(absl::Now() - start), PayloadBytes(payloads),
                         outcome.ok() ? outcome->staleness : 0);
        }
        if (!outcome.ok()) {
          SetError(outcome.status(), &reply);
          reply.clear_pull();
          break;
        }
        if (outcome->fast_forwarded > 0) {
          std::cerr << "tessera-server: shard " << store_->shard() << " fast-forwarded "
                    << outcome->fast_forwarded << " steps to step " << req.push().step()
                    << " to rejoin its workers (those updates are lost on this shard)"
                    << std::endl;
        }
        reply.mutable_push()->set_applied(outcome->applied);
        reply.mutable_push()->set_detail(outcome->detail);
        reply.mutable_push()->set_late(outcome->late);
        if (req.push().return_parameters()) {
          Pull(req.push().step() + 1, reply_area, &reply);
        } else {
          reply.clear_pull();
        }
        break;
      }
      case RequestKind::kPull:
        Pull(req.pull().step(), reply_area, &reply);
        break;
      case RequestKind::kSeveral:
        store_->CountRejected();
        reply.clear_pull();
        SetError(absl::InvalidArgumentError(
                     "a ClientMessage sets more than one of hello, push and pull"),
                 &reply);
        break;
      case RequestKind::kNone:
      case RequestKind::kHello:
        store_->CountRejected();
        reply.clear_pull();
        SetError(resolved.ok() ? absl::InvalidArgumentError(
                                     "expected a push or a pull after the Hello")
                               : resolved,
                 &reply);
    }
    ok = WriteReply(stream, &reply, reply_part_bytes, &reply_part);
  }
  store_->Disconnect(worker, incarnation);
  if (context->IsCancelled()) {
    return grpc::Status(grpc::StatusCode::CANCELLED, "session cancelled");
  }
  return grpc::Status::OK;
}

void ParameterServiceImpl::Pull(int64_t step, absl::Span<char> area, ServerMessage* reply) {
  const absl::Time start = absl::Now();
  absl::Status pulled = store_->Pull(step, pull_timeout_, reply->mutable_pull(), area);
  if (!pulled.ok()) {
    SetError(pulled, reply);
    return;
  }
  if (metrics_ != nullptr) {
    metrics_->Pull(absl::ToDoubleSeconds(absl::Now() - start), PayloadBytes(reply->pull().blocks()));
  }
}

grpc::Status ParameterServiceImpl::ShardStats(
    grpc::ServerContext* context, const tessera::v1::ShardStatsRequest* request,
    tessera::v1::ShardStatsResponse* response) {
  const StoreStats s = store_->stats();
  response->set_shard(store_->shard());
  response->set_version(s.version);
  response->set_pushes_applied(s.pushes_applied);
  response->set_pushes_duplicate(s.pushes_duplicate);
  response->set_pushes_late(s.pushes_late);
  response->set_requests_rejected(s.requests_rejected);
  response->set_nonfinite_rejected(s.nonfinite_rejected);
  response->set_param_sum(store_->ParamSum());
  response->set_live_workers(s.live_workers);
  response->set_num_blocks(
      static_cast<int>(store_->partition().shard_blocks(store_->shard()).size()));
  response->set_param_bytes(store_->partition().shard_bytes(store_->shard()));
  response->set_lost_steps(s.lost_steps);
  response->set_last_checkpoint_step(-1);
  if (std::optional<CheckpointResult> last = last_checkpoint_(); last.has_value()) {
    response->set_last_checkpoint_step(last->step);
    response->set_last_checkpoint_path(last->path);
  }
  return grpc::Status::OK;
}

grpc::Status CoordinatorServiceImpl::RegisterServer(
    grpc::ServerContext* context, const tessera::v1::RegisterServerRequest* request,
    tessera::v1::RegisterServerResponse* response) {
  return ToGrpcStatus(coordinator_->RegisterServer(request->shard(), request->job_hash(),
                                                   request->address()));
}

grpc::Status CoordinatorServiceImpl::Register(
    grpc::ServerContext* context, const tessera::v1::RegisterRequest* request,
    tessera::v1::RegisterResponse* response) {
  absl::StatusOr<int64_t> incarnation =
      coordinator_->Register(request->worker_id(), request->job_hash());
  if (!incarnation.ok()) return ToGrpcStatus(incarnation.status());
  response->set_incarnation(*incarnation);
  return grpc::Status::OK;
}

grpc::Status CoordinatorServiceImpl::Heartbeat(
    grpc::ServerContext* context, const tessera::v1::HeartbeatRequest* request,
    tessera::v1::HeartbeatResponse* response) {
  absl::StatusOr<tessera::v1::HeartbeatResponse> r =
      coordinator_->Heartbeat(*request);
  if (!r.ok()) return ToGrpcStatus(r.status());
  *response = *std::move(r);
  return grpc::Status::OK;
}

grpc::Status CoordinatorServiceImpl::JobStatus(
    grpc::ServerContext* context, const tessera::v1::JobStatusRequest* request,
    tessera::v1::JobStatusResponse* response) {
  *response = coordinator_->Status();
  return grpc::Status::OK;
}

}  // namespace tessera
