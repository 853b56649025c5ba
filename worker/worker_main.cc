// tessera-worker: trains on its slice of the data, pulling parameters from
// and pushing gradients to every shard.

#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "common/allocator.h"
#include "common/discovery.h"
#include "common/flags.h"
#include "common/grpc_status.h"
#include "common/job_spec.h"
#include "common/metrics.h"
#include "common/partition.h"
#include "common/socket_tuning.h"
#include "proto/tessera.grpc.pb.h"
#include "worker/backend_factory.h"
#include "worker/event_writer.h"
#include "worker/grpc_parameter_client.h"
#include "worker/job_data.h"
#include "worker/trainer.h"
#include "worker/worker_metrics.h"

ABSL_FLAG(int32_t, rank, 0, "Worker rank in [0, job.num_workers).");
ABSL_FLAG(std::string, rank_from_env, "",
          "Take the rank from this environment variable instead of --rank "
          "(JOB_COMPLETION_INDEX in a Kubernetes Indexed Job).");
ABSL_FLAG(std::string, servers, "",
          "Comma-separated host:port of every server, in shard order "
          "(default: job.server_addresses, or --server_pattern).");
ABSL_FLAG(std::string, server_pattern, "",
          "Server addresses from a pattern, {i} = shard index, e.g. "
          "tessera-server-{i}.tessera-server:7070.");
ABSL_FLAG(std::string, coordinator, "",
          "host:port of the coordinator (default: the first of --servers).");
ABSL_FLAG(std::string, device, "auto", "Gradient backend: cpu, cuda or auto.");
ABSL_FLAG(std::string, gemm_precision, "fp32",
          "Matrix-product precision on CUDA: fp32, tf32 or bf16 (the CPU "
          "backend always uses fp32).");
ABSL_FLAG(std::string, summary_json, "",
          "Write the final figures as JSON to this file.");
ABSL_FLAG(std::string, dump_params, "",
          "Write the final parameters as raw little-endian float32 to this file.");
ABSL_FLAG(std::optional<bool>, evaluate, std::nullopt,
          "Evaluate on the held-out set after each epoch and print the epoch "
          "lines (default: only rank 0 does).");
ABSL_FLAG(int32_t, connect_timeout_s, 60, "Seconds to wait for each server.");
ABSL_FLAG(int32_t, retry_timeout_s, 120,
          "Seconds a request keeps retrying while its server is unreachable or "
          "restarting, before the worker gives up.");
ABSL_FLAG(int32_t, request_timeout_s, 0,
          "Seconds one request on a server stream may wait for its reply before "
          "the stream is abandoned and the request retried (0: the job's "
          "barrier timeout plus 5 s, since a synchronous pull waits for the barrier).");
ABSL_FLAG(std::string, logdir, "",
          "Write TensorBoard event files (loss curves) to this folder; only "
          "rank 0 writes.");
ABSL_FLAG(std::string, metrics_listen, "",
          "host:port to serve /metrics on (Prometheus text format); port 0 "
          "picks a free port (see --metrics_port_file). Empty: no metrics.");
ABSL_FLAG(std::string, metrics_port_file, "",
          "If set, write the bound metrics port to this file.");

namespace {

constexpr char kUsage[] =
    "tessera-worker: trains a Tessera job's model on its slice of the data.\n\n"
    "Usage: tessera-worker --job=JOB.textproto --rank=R --servers=H:P,H:P,...\n";

int Fail(const std::string& message) {
  std::cerr << "tessera-worker: " << message << std::endl;
  return 1;
}

// Sends progress to the coordinator once a second until stopped. Failures
// are not fatal: the coordinator only reports status.
class Heartbeater {
 public:
  Heartbeater(std::shared_ptr<grpc::Channel> channel, int rank, int64_t incarnation)
      : stub_(tessera::v1::CoordinatorService::NewStub(channel)),
        rank_(rank),
        incarnation_(incarnation),
        thread_([this] { Loop(); }) {}
  ~Heartbeater() {
    stop_.Notify();
    thread_.join();
  }
  void Update(int64_t step, int epoch, double loss) {
    step_.store(step, std::memory_order_relaxed);
    epoch_.store(epoch, std::memory_order_relaxed);
    loss_.store(loss, std::memory_order_relaxed);
  }

 private:
  void Loop() {
    while (!stop_.WaitForNotificationWithTimeout(absl::Seconds(1))) {
      tessera::v1::HeartbeatRequest req;
      req.set_worker_id(rank_);
      req.set_incarnation(incarnation_);
      req.set_step(step_.load(std::memory_order_relaxed));
      req.set_epoch(epoch_.load(std::memory_order_relaxed));
      req.set_loss(loss_.load(std::memory_order_relaxed));
      tessera::v1::HeartbeatResponse resp;
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
      stub_->Heartbeat(&ctx, req, &resp).ok();  // best effort
    }
  }
  std::unique_ptr<tessera::v1::CoordinatorService::Stub> stub_;
  const int rank_;
  const int64_t incarnation_;
  std::atomic<int64_t> step_{0};
  std::atomic<int> epoch_{0};
  std::atomic<double> loss_{0};
  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace

int main(int argc, char** argv) {
  tessera::TuneAllocatorForLargeMessages();
  tessera::ParseFlagsOrExit(argc, argv, kUsage);
  const std::string job_path = tessera::JobFlag();
  if (job_path.empty()) return Fail("--job is required (a JobSpec text file)");
  absl::StatusOr<tessera::v1::JobSpec> job =
      tessera::LoadJob(job_path, tessera::JobOverridesFromFlags());
  if (!job.ok()) return Fail(std::string(job.status().message()));
  int rank = absl::GetFlag(FLAGS_rank);
  const std::string rank_env = absl::GetFlag(FLAGS_rank_from_env);
  if (!rank_env.empty()) {
    absl::StatusOr<int> r = tessera::IndexFromEnvValue(rank_env, getenv(rank_env.c_str()));
    if (!r.ok()) return Fail(absl::StrCat("--rank_from_env: ", r.status().message()));
    rank = *r;
  }
  if (rank < 0 || rank >= job->num_workers()) {
    return Fail(absl::StrCat("--rank=", rank, " is out of range: job.num_workers is ",
                             job->num_workers()));
  }
  std::vector<std::string> servers =
      absl::StrSplit(absl::GetFlag(FLAGS_servers), ',', absl::SkipEmpty());
  if (servers.empty() && !absl::GetFlag(FLAGS_server_pattern).empty()) {
    absl::StatusOr<std::vector<std::string>> expanded =
        tessera::ExpandServerPattern(absl::GetFlag(FLAGS_server_pattern), job->num_shards());
    if (!expanded.ok()) return Fail(absl::StrCat("--server_pattern: ", expanded.status().message()));
    servers = *expanded;
  }
  if (servers.empty()) servers.assign(job->server_addresses().begin(), job->server_addresses().end());
  if (static_cast<int>(servers.size()) != job->num_shards()) {
    return Fail(absl::StrCat("the server list (--servers, --server_pattern or "
                             "job.server_addresses) has ", servers.size(),
                             " addresses but job.num_shards is ", job->num_shards()));
  }
  const uint64_t job_hash = tessera::JobHash(*job);
  for (const auto& [name, value] :
       {std::pair<const char*, int32_t>{"--connect_timeout_s", absl::GetFlag(FLAGS_connect_timeout_s)},
        {"--retry_timeout_s", absl::GetFlag(FLAGS_retry_timeout_s)},
        {"--request_timeout_s", absl::GetFlag(FLAGS_request_timeout_s)}}) {
    if (value < 0) return Fail(absl::StrCat(name, " must not be negative, got ", value));
  }
  absl::StatusOr<tessera::SocketTuning> socket_tuning = tessera::SocketTuningFromFlags();
  if (!socket_tuning.ok()) return Fail(std::string(socket_tuning.status().message()));
  absl::StatusOr<int64_t> part_bytes =
      tessera::StreamPartBytesFromFlags(tessera::GrpcClientOptions().part_bytes);
  if (!part_bytes.ok()) return Fail(std::string(part_bytes.status().message()));

  absl::StatusOr<tessera::ModelSpec> model =
      tessera::ParseModelSpec(job->model(), tessera::JobLoss(*job));
  if (!model.ok()) return Fail(std::string(model.status().message()));
  absl::StatusOr<tessera::Partition> partition =
      tessera::Partition::Create(*model, job->num_shards(), job->block_bytes());
  if (!partition.ok()) return Fail(std::string(partition.status().message()));
  absl::StatusOr<tessera::JobData> data = tessera::LoadJobData(*job, *model);
  if (!data.ok()) return Fail(std::string(data.status().message()));
  absl::StatusOr<std::unique_ptr<tessera::GradientBackend>> backend =
      tessera::CreateBackend(absl::GetFlag(FLAGS_device), *model,
                             tessera::EvalChunkRows(*job),
                             absl::GetFlag(FLAGS_gemm_precision));
  if (!backend.ok()) return Fail(std::string(backend.status().message()));
  // Rank 0 alone writes TensorBoard events: one folder, one set of curves.
  // Created before any server is contacted, so a bad --logdir fails first.
  std::unique_ptr<tessera::EventWriter> events;
  if (rank == 0 && !absl::GetFlag(FLAGS_logdir).empty()) {
    absl::StatusOr<std::unique_ptr<tessera::EventWriter>> writer =
        tessera::EventWriter::Create(absl::GetFlag(FLAGS_logdir));
    if (!writer.ok()) return Fail(absl::StrCat("--logdir: ", writer.status().message()));
    events = *std::move(writer);
  }

  // Register with the coordinator for an incarnation.
  std::string coordinator = absl::GetFlag(FLAGS_coordinator);
  if (coordinator.empty()) coordinator = servers[0];
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
      tessera::MakeChannelCredentials(tessera::SecurityFilesFromFlags());
  if (!credentials.ok()) return Fail(std::string(credentials.status().message()));
  auto coord_channel = tessera::CreateTunedChannel(coordinator, *credentials, *socket_tuning);
  const auto connect_deadline =
      std::chrono::system_clock::now() +
      std::chrono::seconds(absl::GetFlag(FLAGS_connect_timeout_s));
  if (!coord_channel->WaitForConnected(connect_deadline)) {
    return Fail(absl::StrCat("coordinator ", coordinator, " not reachable"));
  }
  tessera::v1::RegisterRequest reg;
  reg.set_worker_id(rank);
  reg.set_job_hash(job_hash);
  tessera::v1::RegisterResponse reg_reply;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    absl::Status s = tessera::FromGrpcStatus(
        tessera::v1::CoordinatorService::NewStub(coord_channel)->Register(&ctx, reg, &reg_reply));
    if (!s.ok()) return Fail(absl::StrCat("register with ", coordinator, ": ", s.message()));
  }

  tessera::GrpcClientOptions client_options;
  client_options.servers = servers;
  client_options.worker_id = rank;
  client_options.incarnation = reg_reply.incarnation();
  client_options.job_hash = job_hash;
  client_options.credentials = *credentials;
  client_options.socket_tuning = *socket_tuning;
  client_options.shared_memory = tessera::SharedMemoryFromFlags();
  client_options.part_bytes = *part_bytes;
  client_options.wire_dtype = job->wire_dtype();
  client_options.top_k_fraction = job->top_k_fraction();
  client_options.connect_timeout = absl::Seconds(absl::GetFlag(FLAGS_connect_timeout_s));
  client_options.retry_timeout = absl::Seconds(absl::GetFlag(FLAGS_retry_timeout_s));
  client_options.request_timeout =
      absl::GetFlag(FLAGS_request_timeout_s) > 0
          ? absl::Seconds(absl::GetFlag(FLAGS_request_timeout_s))
          : absl::Milliseconds(job->consistency().barrier_timeout_ms()) + absl::Seconds(5);
  int64_t largest_shard = 0;
  for (int s = 0; s < job->num_shards(); ++s) {
    largest_shard = std::max(largest_shard, partition->shard_bytes(s));
  }
  client_options.max_message_bytes =
      static_cast<int>(std::min<int64_t>(INT32_MAX, std::max<int64_t>(4 << 20, largest_shard + (1 << 20))));
  absl::StatusOr<std::unique_ptr<tessera::ParameterClient>> client =
      tessera::CreateGrpcParameterClient(*partition, client_options);
  if (!client.ok()) return Fail(std::string(client.status().message()));

  std::unique_ptr<tessera::MetricsEndpoint> metrics;
  std::unique_ptr<tessera::WorkerMetrics> worker_metrics;
  if (!absl::GetFlag(FLAGS_metrics_listen).empty()) {
    absl::StatusOr<std::unique_ptr<tessera::MetricsEndpoint>> m =
        tessera::MetricsEndpoint::Start(absl::GetFlag(FLAGS_metrics_listen));
    if (!m.ok()) return Fail(std::string(m.status().message()));
    metrics = *std::move(m);
    worker_metrics = std::make_unique<tessera::WorkerMetrics>(metrics->registry(), rank,
                                                              job->batch_size());
    const std::string port_file = absl::GetFlag(FLAGS_metrics_port_file);
    if (!port_file.empty() && !tessera::WritePortFile(port_file, metrics->port())) {
      return Fail(absl::StrCat("cannot write --metrics_port_file '", port_file, "'"));
    }
  }

  Heartbeater heartbeat(coord_channel, rank, reg_reply.incarnation());
  tessera::TrainerOptions options;
  options.rank = rank;
  options.evaluate = absl::GetFlag(FLAGS_evaluate).value_or(rank == 0);
  options.out = &std::cout;
  options.progress_bar = rank == 0 && isatty(STDOUT_FILENO);
  options.events = events.get();
  options.layerwise_push = tessera::LayerwisePushFromFlags();
  options.on_step = [&heartbeat, &worker_metrics](int64_t step, int epoch, double loss) {
    heartbeat.Update(step + 1, epoch, loss);
    if (worker_metrics != nullptr) worker_metrics->Step(step, epoch, loss);
  };
  if (rank == 0) {
    std::cout << "job '" << job->name() << "': " << job->model() << ", "
              << tessera::ModeName(job->consistency().mode()) << ", "
              << job->num_workers() << " workers x batch " << job->batch_size()
              << ", " << job->num_shards() << " shards, " << data->train.rows
              << " training / " << data->test.rows << " held-out samples, backend "
              << (*backend)->name() << std::endl;
  }
  absl::StatusOr<tessera::TrainSummary> summary =
      tessera::Train(*job, *model, data->train, data->test, backend->get(),
                     client->get(), options);
  if (!summary.ok()) return Fail(std::string(summary.status().message()));
  client->reset();  // close the streams: this worker leaves the barrier
  if (summary->steps == 0 && summary->first_step > 0) {
    // The servers keep a job's progress while they run, so a second run of
    // the same job against them finds its steps done.
    std::cerr << "tessera-worker: nothing left to train: the servers already hold step "
              << summary->first_step << ", this job's last for rank " << rank
              << "; start fresh servers (or run another job) for a new run" << std::endl;
  }

  if (options.evaluate) {
    std::cout << "done: " << summary->steps << " steps in "
              << absl::StrFormat("%.1f", summary->wall_seconds) << "s, "
              << absl::StrFormat("%.0f", summary->samples_per_sec) << " samples/s";
    if (summary->classification) {
      std::cout << absl::StrFormat(", test_accuracy: %.4f", summary->test_accuracy);
    }
    std::cout << absl::StrFormat(", test_loss: %.4f", summary->test_loss) << std::endl;
  }
  const std::string summary_path = absl::GetFlag(FLAGS_summary_json);
  if (!summary_path.empty()) {
    std::ofstream out(summary_path);
    out << tessera::SummaryJson(*summary, *job);
    if (!out.good()) return Fail(absl::StrCat("cannot write --summary_json '", summary_path, "'"));
  }
  const std::string dump_path = absl::GetFlag(FLAGS_dump_params);
  if (!dump_path.empty()) {
    std::ofstream out(dump_path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(summary->final_params.data()),
              summary->final_params.size() * sizeof(float));
    if (!out.good()) return Fail(absl::StrCat("cannot write --dump_params '", dump_path, "'"));
  }
  return 0;
}
