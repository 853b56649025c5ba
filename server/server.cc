#include "server/server.h"

#include <algorithm>
#include <chrono>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "absl/strings/str_cat.h"
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
  s->server_->GetHealthCheckService()->SetServingStatus(true);
  return s;
}

TesseraServer::~TesseraServer() {
  if (server_ != nullptr) {
    Shutdown(absl::ZeroDuration());
    server_->Wait();
  }
}

void TesseraServer::Shutdown(absl::Duration grace) {
  server_->GetHealthCheckService()->SetServingStatus(false);
  store_->Shutdown();
  server_->Shutdown(std::chrono::system_clock::now() +
                    absl::ToChronoMilliseconds(grace));
}

void TesseraServer::Wait() { server_->Wait(); }

}  // namespace tessera
