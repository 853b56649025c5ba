#include "server/server.h"

#include <algorithm>
#include <chrono>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "absl/strings/str_cat.h"
#include "proto/tessera.grpc.pb.h"
#include "common/job_spec.h"
#include "common/status_macros.h"

namespace tessera {

absl::StatusOr<std::unique_ptr<TesseraServer>> TesseraServer::Start(
    const ServerOptions& options) {
  std::unique_ptr<TesseraServer> s(new TesseraServer());
  TESSERA_ASSIGN_OR_RETURN(s->store_, ShardStore::Create(options.job, options.shard));
  const uint64_t job_hash = JobHash(options.job);
  s->parameter_service_ = std::make_unique<ParameterServiceImpl>(
      s->store_.get(), job_hash,
      absl::Milliseconds(options.job.consistency().barrier_timeout_ms()));

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen_address,
                           grpc::InsecureServerCredentials(), &s->port_);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  // A push carries at most this shard's gradients; anything larger than
  // that plus framing slack is refused by gRPC with RESOURCE_EXHAUSTED.
  const int64_t limit = std::max<int64_t>(
      4 << 20, s->store_->partition().shard_bytes(options.shard) + (1 << 20));
  builder.SetMaxReceiveMessageSize(static_cast<int>(std::min<int64_t>(limit, INT32_MAX)));
  builder.SetMaxSendMessageSize(-1);
  builder.RegisterService(s->parameter_service_.get());
  if (options.host_coordinator) {
    s->coordinator_ = std::make_unique<Coordinator>(options.job, job_hash);
    s->coordinator_service_ =
        std::make_unique<CoordinatorServiceImpl>(s->coordinator_.get());
    builder.RegisterService(s->coordinator_service_.get());
  }
  s->server_ = builder.BuildAndStart();
  if (s->server_ == nullptr || s->port_ == 0) {
    return absl::UnavailableError(absl::StrCat(
        "cannot listen on ", options.listen_address,
        " (address in use or not available)"));
  }
  // gRPC's health service starts out SERVING; this server is not ready
  // until it has joined the coordinator.
  s->SetServing(false);
  if (options.host_coordinator) {
    absl::Status joined = s->coordinator_->RegisterServer(
        options.shard, job_hash, options.advertised_address);
    if (!joined.ok()) return joined;
    s->SetServing(true);
  } else if (options.coordinator_address.empty()) {
    s->SetServing(true);
  } else {
    s->joiner_ = std::thread(&TesseraServer::JoinLoop, s.get(), options, job_hash);
  }
  return s;
}

void TesseraServer::JoinLoop(ServerOptions options, uint64_t job_hash) {
  auto channel = grpc::CreateChannel(options.coordinator_address,
                                     grpc::InsecureChannelCredentials());
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

absl::Status TesseraServer::Wait() {
  server_->Wait();
  if (joiner_.joinable()) joiner_.join();
  absl::MutexLock lock(&mu_);
  return failure_;
}

}  // namespace tessera
