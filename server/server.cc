#include "server/server.h"

#include <algorithm>
#include <chrono>
#include <iostream>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "proto/tessera.grpc.pb.h"
#include "common/job_spec.h"
#include "common/status_macros.h"
#include "server/apply_pool.h"

namespace tessera {

absl::StatusOr<std::unique_ptr<TesseraServer>> TesseraServer::Start(
    const ServerOptions& options) {
  std::unique_ptr<TesseraServer> s(new TesseraServer());
  TESSERA_ASSIGN_OR_RETURN(s->store_, ShardStore::Create(options.job, options.shard));
  // A worker whose last stream ends has 1 s to open a new one before a
  // synchronous step goes on without it (see ShardStore::Disconnect).
  s->store_->SetDepartureGrace(absl::Seconds(1));
  s->store_->SetApplyThreads(options.apply_threads > 0 ? options.apply_threads
                                                       : DefaultApplyThreads());
  const uint64_t job_hash = JobHash(options.job);
  const tessera::v1::JobSpec& job = options.job;
  s->checkpoint_timeout_ = absl::Milliseconds(job.consistency().barrier_timeout_ms());
  if (!job.checkpoint().dir().empty()) {
    TESSERA_ASSIGN_OR_RETURN(
        ModelSpec model,
        ParseModelSpec(job.model(), job.loss() == tessera::v1::SOFTMAX_CROSS_ENTROPY
                                        ? LossKind::kSoftmaxCrossEntropy
                                        : LossKind::kMeanSquaredError));
    CheckpointInfo info;
    info.job_name = job.name();
    info.model = job.model();
    info.optimizer_type = tessera::v1::OptimizerType_Name(job.optimizer().type());
    info.shard = options.shard;
    info.num_shards = job.num_shards();
    if (int stale = RemoveStaleTemporaries(job.checkpoint().dir(), options.shard); stale > 0) {
      std::cerr << "tessera-server: shard " << options.shard << " removed " << stale
                << " partial checkpoint file(s) left by an interrupted write" << std::endl;
    }
    std::vector<std::string> skipped;
    absl::StatusOr<std::optional<RestoredModel>> restored = LoadShardCheckpoint(
        job.checkpoint().dir(), info, model, s->store_->num_slots(), &skipped);
    for (const std::string& why : skipped) {
      std::cerr << "tessera-server: shard " << options.shard << " skipped checkpoint " << why
                << std::endl;
    }
    if (!restored.ok()) return Annotate(restored.status(), "job.checkpoint.dir");
    if (restored->has_value()) {
      s->store_->Restore(**restored);
      std::cerr << "tessera-server: shard " << options.shard << " resumed from "
                << (*restored)->path << " (step " << (*restored)->step << ")" << std::endl;
    }
    s->checkpointer_ = std::make_unique<Checkpointer>(
        job.checkpoint().dir(), info, model,
        job.checkpoint().keep() > 0 ? job.checkpoint().keep() : 3);
    Checkpointer* cp = s->checkpointer_.get();
    s->store_->SetCheckpointHook(job.checkpoint().every_steps(),
                                 [cp](ShardState state) { cp->Submit(std::move(state)); });
  }
  if (options.host_coordinator) {
    s->coordinator_ = std::make_unique<Coordinator>(options.job, job_hash);
    s->coordinator_service_ = std::make_unique<CoordinatorServiceImpl>(s->coordinator_.get());
  }
  if (!options.metrics_address.empty()) {
    TESSERA_ASSIGN_OR_RETURN(s->metrics_, MetricsEndpoint::Start(options.metrics_address));
    s->metrics_->Add(MakeStoreCollector(s->store_.get(), s->coordinator_.get()));
    s->service_metrics_ =
        std::make_unique<ServiceMetrics>(s->metrics_->registry(), options.shard);
  }
  TesseraServer* self = s.get();
  s->parameter_service_ = std::make_unique<ParameterServiceImpl>(
      s->store_.get(), job_hash, absl::Milliseconds(job.consistency().barrier_timeout_ms()),
      [self] { return self->CheckpointNow(); }, s->service_metrics_.get(),
      options.max_sessions > 0 ? options.max_sessions : 4 * job.num_workers() + 8,
      [self]() -> std::optional<CheckpointResult> {
        if (self->checkpointer_ == nullptr) return std::nullopt;
        CheckpointResult last = self->checkpointer_->last();
        if (last.generation == 0 || !last.status.ok()) return std::nullopt;
        return last;
      });

  s->parameter_service_->AllowSharedMemory(options.allow_shared_memory);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  TESSERA_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                           MakeServerCredentials(options.security));
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen_address, credentials, &s->port_);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  ApplySocketTuning(options.socket_tuning, &builder);
  // Accept the workers' keepalive pings (every 10 s, also between calls);
  // the server pings too, so a vanished worker's stream ends and it leaves
  // the barrier instead of holding it for the TCP timeout.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 5000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  // A push carries at most this shard's gradients; anything larger than
  // that plus framing slack is refused by gRPC with RESOURCE_EXHAUSTED.
  const int64_t limit = std::max<int64_t>(
      4 << 20, s->store_->partition().shard_bytes(options.shard) + (1 << 20));
  builder.SetMaxReceiveMessageSize(static_cast<int>(std::min<int64_t>(limit, INT32_MAX)));
  builder.SetMaxSendMessageSize(-1);
  builder.RegisterService(s->parameter_service_.get());
  if (s->coordinator_service_ != nullptr) builder.RegisterService(s->coordinator_service_.get());
  s->server_ = builder.BuildAndStart();
  if (s->server_ == nullptr || s->port_ == 0) {
    return absl::UnavailableError(absl::StrCat(
        "cannot listen on ", options.listen_address,
        " (address in use or not available)"));
  }
  // gRPC's health service starts out SERVING; this server is not ready
  // until it has joined the coordinator.
  s->SetServing(false);
  ServerOptions joined_options = options;
  if (absl::EndsWith(joined_options.advertised_address, ":0")) {
    std::string& a = joined_options.advertised_address;
    a = absl::StrCat(a.substr(0, a.size() - 1), s->port_);
  }
  if (options.host_coordinator) {
    absl::Status joined = s->coordinator_->RegisterServer(
        options.shard, job_hash, joined_options.advertised_address);
    if (!joined.ok()) return joined;
    s->SetServing(true);
  } else if (options.coordinator_address.empty()) {
    s->SetServing(true);
  } else {
    s->joiner_ = std::thread(&TesseraServer::JoinLoop, s.get(), joined_options, job_hash);
  }
  if (s->checkpointer_ != nullptr && job.checkpoint().every_seconds() > 0) {
    s->checkpoint_timer_ = std::thread(&TesseraServer::CheckpointTimerLoop, s.get(),
                                       absl::Seconds(job.checkpoint().every_seconds()));
  }
  return s;
}

void TesseraServer::JoinLoop(ServerOptions options, uint64_t job_hash) {
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
      MakeChannelCredentials(options.security);
  if (!credentials.ok()) {
    {
      absl::MutexLock lock(&mu_);
      failure_ = credentials.status();
    }
    Shutdown(absl::ZeroDuration());
    return;
  }
  auto channel =
      CreateTunedChannel(options.coordinator_address, *credentials, options.socket_tuning);
  auto stub = tessera::v1::CoordinatorService::NewStub(channel);
  tessera::v1::RegisterServerRequest request;
  request.set_shard(options.shard);
  request.set_job_hash(job_hash);
  request.set_address(options.advertised_address);
  absl::Duration backoff = absl::Milliseconds(50);
  while (!stopping_.HasBeenNotified()) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    tessera::v1::RegisterServerResponse response;
    const grpc::Status status = stub->RegisterServer(&ctx, request, &response);
    if (status.ok()) {
      SetServing(true);
      return;
    }
    if (status.error_code() == grpc::StatusCode::FAILED_PRECONDITION ||
        status.error_code() == grpc::StatusCode::INVALID_ARGUMENT) {
      {
        absl::MutexLock lock(&mu_);
        failure_ = absl::FailedPreconditionError(absl::StrCat(
            "coordinator ", options.coordinator_address, " refused shard ", options.shard,
            ": ", status.error_message()));
      }
      Shutdown(absl::ZeroDuration());
      return;
    }
    stopping_.WaitForNotificationWithTimeout(backoff);
    backoff = std::min(backoff * 2, absl::Seconds(2));
  }
}

void TesseraServer::SetServing(bool serving) {
  absl::MutexLock lock(&mu_);
  serving_ = serving;
  server_->GetHealthCheckService()->SetServingStatus(serving);
}

bool TesseraServer::serving() const {
  absl::MutexLock lock(&mu_);
  return serving_;
}

TesseraServer::~TesseraServer() {
  if (server_ != nullptr) {
    Shutdown(absl::ZeroDuration());
    server_->Wait();
  }
  if (joiner_.joinable()) joiner_.join();
  if (checkpoint_timer_.joinable()) checkpoint_timer_.join();
  // Members go in reverse order, coordinator_ and service_metrics_ before
  // metrics_: stop the /metrics thread first, since a scrape reads them.
  metrics_.reset();
}

void TesseraServer::Shutdown(absl::Duration grace) {
  bool first = false;
  {
    absl::MutexLock lock(&mu_);
    first = !shutdown_called_;
    shutdown_called_ = true;
  }
  if (first) stopping_.Notify();
  SetServing(false);
  store_->Shutdown();
  server_->Shutdown(std::chrono::system_clock::now() +
                    absl::ToChronoMilliseconds(grace));
}

absl::StatusOr<CheckpointResult> TesseraServer::CheckpointNow() {
  if (checkpointer_ == nullptr) {
    return absl::FailedPreconditionError("checkpoints are off: job.checkpoint.dir is not set");
  }
  const int64_t generation = checkpointer_->last().generation;
  store_->RequestCheckpoint();
  TESSERA_ASSIGN_OR_RETURN(CheckpointResult r,
                           checkpointer_->WaitAfter(generation, checkpoint_timeout_));
  if (!r.status.ok()) return r.status;
  return r;
}

void TesseraServer::CheckpointTimerLoop(absl::Duration period) {
  // Shard version at the last timed request; the state the server started
  // with (fresh, or restored from a checkpoint) needs no checkpoint.
  int64_t requested_at = store_->stats().version;
  while (!stopping_.WaitForNotificationWithTimeout(period)) {
    const int64_t version = store_->stats().version;
    const CheckpointResult last = checkpointer_->last();
    // Nothing new since the newest checkpoint (or since the last request,
    // which a synchronous step in flight may still be holding back).
    if (version == requested_at ||
        (last.generation > 0 && last.status.ok() && last.step == version)) {
      continue;
    }
    requested_at = version;
    store_->RequestCheckpoint();
  }
}

absl::Status TesseraServer::Wait() {
  server_->Wait();
  if (joiner_.joinable()) joiner_.join();
  if (checkpoint_timer_.joinable()) checkpoint_timer_.join();
  if (checkpointer_ != nullptr && !final_checkpoint_written_) {
    // No handler runs any more: the state is final. Skip the write when the
    // newest checkpoint already holds it.
    final_checkpoint_written_ = true;
    const ShardState state = store_->Snapshot();
    const CheckpointResult last = checkpointer_->last();
    if (last.generation == 0 || !last.status.ok() || last.step != state.step) {
      const CheckpointResult r = checkpointer_->WriteNow(state);
      if (!r.status.ok()) return Annotate(r.status, "final checkpoint");
    }
  }
  absl::MutexLock lock(&mu_);
  return failure_;
}

}  // namespace tessera
