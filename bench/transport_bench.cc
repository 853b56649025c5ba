// Transport benchmark: dense push and pull through a real tessera-server on
// 127.0.0.1, one server and one worker stream, at several payload sizes,
// with the memory-copy floor and the CPU-only protobuf costs measured in the
// same process.
//
// For each size N MiB the bench writes a job whose model has exactly N MiB
// of parameters ("linear:K-1" with K = N * 262144 - 1 weights and 1 bias),
// SGD, ASYNC, one shard; starts `tessera-server` with --port_file; opens one
// Session stream (Hello, then requests); warms up; and times rounds of
// pushes (return_parameters = false) and pulls. A push re-encodes the
// gradient buffer into the reused request, as the worker does; a pull
// decodes the reply into a float buffer, as the worker does. GB/s is payload
// bytes (parameter bytes, 1 GB = 1e9 bytes) over wall time per operation;
// the median over rounds is the figure, min and max are kept.
//
// The same loops also run against a "no-op" server started from this binary
// (--serve_noop): the same proto service and threading model (sync gRPC
// Session), but a push is only parsed and acknowledged and a pull returns a
// prebuilt reply. Its figures are the floor that gRPC and protobuf leave for
// the store, so the gap between the two rows is Tessera's server-side work.
//
// Output: one JSON document (stdout, or --out). Progress goes to stderr.
//
// Usage: transport_bench [--bin_dir=build/bin] [--sizes_mib=1,16,64]
//                        [--rounds=7] [--round_mib=512] [--out=FILE]

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/allocator.h"
#include "common/job_spec.h"
#include "common/model_spec.h"
#include "common/partition.h"
#include "common/protocol.h"
#include "common/session_stream.h"
#include "common/shared_region.h"
#include "common/socket_tuning.h"
#include "common/subprocess.h"
#include "common/tensor_codec.h"
#include "proto/tessera.grpc.pb.h"

ABSL_FLAG(std::string, bin_dir, "",
          "Folder holding tessera-server (default: this binary's folder).");
ABSL_FLAG(std::string, sizes_mib, "1,16,64", "Payload sizes in MiB, comma-separated.");
ABSL_FLAG(int32_t, rounds, 7, "Timed rounds per size and direction; the median is reported.");
ABSL_FLAG(int64_t, round_mib, 512,
          "Payload per timed round in MiB (at least 4 operations per round).");
ABSL_FLAG(int64_t, block_bytes, 4 << 20, "job.block_bytes of the benchmark job.");
ABSL_FLAG(int64_t, stream_part_bytes, 4 << 20,
          "Pushes and pulled parameters on the stream go in parts of at least this many "
          "payload bytes (whole blocks; 0: one message each), as workers exchange them.");
ABSL_FLAG(std::string, tcp_congestion, "",
          "TCP congestion-control algorithm of every socket of the run, as the processes' "
          "flag of that name (empty: cubic on loopback where allowed, as workers and "
          "servers do).");
ABSL_FLAG(int32_t, apply_threads, 0,
          "tessera-server's --apply_threads (0: the server's default).");
ABSL_FLAG(bool, noop_baseline, true,
          "Also run the loops against the no-op gRPC server (gRPC + protobuf floor).");
ABSL_FLAG(std::string, directions, "push,pull", "Which loops to time: push, pull or both.");
ABSL_FLAG(bool, floors, true, "Also time memcpy and the protobuf CPU costs in this process.");
ABSL_FLAG(std::string, out, "", "Write the JSON document here (default: stdout).");
ABSL_FLAG(std::string, serve_noop, "",
          "Internal: run the no-op server for --job and write its port to this file.");
ABSL_FLAG(std::string, job, "", "Internal: the job file the no-op server serves.");
ABSL_FLAG(std::string, transport, "tcp",
          "tcp (127.0.0.1, ephemeral port), unix (a Unix-domain socket in the run's "
          "temporary folder) or shm (TCP for the messages, payloads through the same-host "
          "shared-memory region as workers use; no no-op baseline).");
ABSL_FLAG(std::string, listen, "", "Internal: the no-op server's listening address.");

namespace tessera {
namespace {

using tessera::v1::ClientMessage;
using tessera::v1::ServerMessage;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string JsonArray(const std::vector<double>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) {
    absl::StrAppend(&out, i == 0 ? "" : ", ", absl::StrFormat("%.4f", v[i]));
  }
  out += "]";
  return out;
}

bool WriteFile(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary);
    out << text;
    if (!out.good()) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// CPU time and page faults of a process.
struct Usage {
  double cpu_s = 0;     // user + system
  double minflt = 0;    // minor page faults (fresh pages mapped in)
};

// From /proc/PID/stat.
Usage ProcessUsage(pid_t pid) {
  Usage u;
  std::ifstream in(absl::StrCat("/proc/", pid, "/stat"));
  std::string line;
  std::getline(in, line);
  const size_t paren = line.rfind(')');
  if (paren == std::string::npos) return u;
  std::vector<std::string> f = absl::StrSplit(line.substr(paren + 2), ' ');
  // After "pid (comm) " field 3 (state) is f[0]; minflt is field 10 (f[7]),
  // utime and stime are fields 14 and 15 (f[11], f[12]).
  if (f.size() < 13) return u;
  double utime = 0, stime = 0, minflt = 0;
  if (!absl::SimpleAtod(f[11], &utime) || !absl::SimpleAtod(f[12], &stime) ||
      !absl::SimpleAtod(f[7], &minflt)) {
    return u;
  }
  u.cpu_s = (utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
  u.minflt = minflt;
  return u;
}

Usage SelfUsage() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  Usage u;
  u.cpu_s = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec +
            ru.ru_stime.tv_usec * 1e-6;
  u.minflt = static_cast<double>(ru.ru_minflt);
  return u;
}

std::string JobText(int64_t size_mib, int64_t block_bytes) {
  const int64_t weights = size_mib * 262144 - 1;  // + 1 bias = size_mib MiB of floats
  return absl::StrCat(
      "name: \"transport-bench-", size_mib, "mib\"\n",
      "model: \"linear:", weights, "-1\"\n",
      "loss: MEAN_SQUARED_ERROR\n",
      "data { format: SYNTHETIC_REGRESSION num_samples: 100 validation_fraction: 0.2 }\n",
      "optimizer { type: SGD learning_rate: 1e-9 }\n",
      "consistency { mode: ASYNC }\n",
      "batch_size: 1\nepochs: 1\nnum_shards: 1\nnum_workers: 1\n",
      "block_bytes: ", block_bytes, "\n");
}

// ---------------------------------------------------------------------------
// The no-op server: same service, same sync threading, no store. It
// answers a push sent in parts once, after the last part, and sends
// parameters in one message (it ignores Hello.reply_part_bytes).
// ---------------------------------------------------------------------------

class NoopService final : public tessera::v1::ParameterService::Service {
 public:
  NoopService(const Partition& partition) {
    tessera::v1::PullResult* pull = pull_reply_.mutable_pull();
    pull->set_version(1);
    for (uint32_t id : partition.shard_blocks(0)) {
      const BlockInfo& b = partition.blocks()[id];
      tessera::v1::TensorBlock* tb = pull->add_blocks();
      tb->set_block_id(b.id);
      tb->set_dtype(tessera::v1::F32);
      tb->mutable_data()->assign(b.num_elements * 4, '\0');
    }
  }

  grpc::Status Session(grpc::ServerContext* context,
                       grpc::ServerReaderWriter<ServerMessage, ClientMessage>* stream) override {
    ClientMessage request;
    ServerMessage ack;
    ack.mutable_push()->set_applied(true);
    ServerMessage hello_reply;
    if (!stream->Read(&request)) return grpc::Status::OK;
    hello_reply.set_request_id(request.request_id());
    hello_reply.set_protocol_version(kSessionProtocolVersion);
    bool ok = stream->Write(hello_reply);
    while (ok && stream->Read(&request)) {
      if (request.has_pull()) {
        pull_reply_.set_request_id(request.request_id());
        ok = stream->Write(pull_reply_);
      } else if (!request.push().more_parts()) {  // one reply per push, after its last part
        ack.set_request_id(request.request_id());
        ok = stream->Write(ack);
      }
    }
    return grpc::Status::OK;
  }

 private:
  ServerMessage pull_reply_;  // one stream at a time in this bench
};

// The sockets' options workers and servers use by default (or with
// --tcp_congestion).
absl::StatusOr<SocketTuning> BenchTuning() {
  SocketTuning tuning;
  tuning.tcp_rto_min_us = kDefaultTcpRtoMinUs;
  tuning.tcp_congestion = absl::GetFlag(FLAGS_tcp_congestion);
  return ResolveSocketTuning(std::move(tuning));
}

int ServeNoop(const std::string& job_path, const std::string& listen,
              const std::string& port_file) {
  absl::StatusOr<tessera::v1::JobSpec> job = LoadJob(job_path, {});
  if (!job.ok()) {
    std::cerr << "transport_bench: " << job.status() << "\n";
    return 1;
  }
  absl::StatusOr<ModelSpec> model = ParseModelSpec(job->model(), LossKind::kMeanSquaredError);
  if (!model.ok()) return 1;
  absl::StatusOr<Partition> partition = Partition::Create(*model, 1, job->block_bytes());
  if (!partition.ok()) return 1;
  NoopService service(*partition);
  absl::StatusOr<SocketTuning> tuning = BenchTuning();
  if (!tuning.ok()) {
    std::cerr << "transport_bench: " << tuning.status().message() << "\n";
    return 1;
  }
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
  ApplySocketTuning(*tuning, &builder);
  builder.SetMaxReceiveMessageSize(-1);
  builder.SetMaxSendMessageSize(-1);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) return 1;
  if (!WriteFile(port_file, absl::StrCat(port, "\n"))) return 1;
  server->Wait();  // until SIGTERM/SIGKILL from the parent
  return 0;
}

// ---------------------------------------------------------------------------
// Client side.
// ---------------------------------------------------------------------------

// A server child process on 127.0.0.1 with an ephemeral port.
struct ServerChild {
  std::unique_ptr<Subprocess> process;
  int port = 0;
};

absl::StatusOr<ServerChild> StartServer(const std::vector<std::string>& argv,
                                        const std::string& port_file, const std::string& log) {
  SpawnOptions opt;
  opt.argv = argv;
  opt.stdout_path = opt.stderr_path = log;
  absl::StatusOr<std::unique_ptr<Subprocess>> p = Subprocess::Spawn(opt);
  if (!p.ok()) return p.status();
  ServerChild child;
  child.process = *std::move(p);
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (absl::Now() < deadline) {
    std::ifstream in(port_file);
    if (in >> child.port && child.port > 0) return child;
    if (child.process->Poll().has_value()) break;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return absl::UnavailableError(
      absl::StrCat(argv[0], " did not start; its log:\n", ReadFile(log)));
}

// Phase times of one timed round, in seconds summed over its operations.
struct Phases {
  double encode = 0;  // push: gradients into the request; pull: reply into floats
  double write = 0;   // stream->Write (serialisation and hand-off to gRPC)
  double read = 0;    // stream->Read (waiting for and parsing the reply)
};

struct DirectionResult {
  std::vector<double> gbps;  // one per round
  int ops_per_round = 0;
  Phases phases;             // summed over all rounds
  double client_cpu_s = 0;   // over all rounds
  double server_cpu_s = 0;
  double client_minflt = 0;  // over all rounds
  double server_minflt = 0;
  double total_wall_s = 0;
  int64_t total_bytes = 0;
};

class BenchClient {
 public:
  BenchClient(const std::string& target, const Partition& partition, uint64_t job_hash,
              bool shared_memory, const SocketTuning& tuning)
      : partition_(partition) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    args.SetMaxSendMessageSize(-1);
    // The sockets the workers' channels would have.
    channel_ = CreateTunedChannel(target, grpc::InsecureChannelCredentials(), tuning, args);
    stream_ = std::make_unique<SessionStream>(channel_, &ctx_);
    ClientMessage hello;
    hello.set_request_id(++id_);
    hello.mutable_hello()->set_worker_id(0);
    hello.mutable_hello()->set_incarnation(1);
    hello.mutable_hello()->set_job_hash(job_hash);
    hello.mutable_hello()->set_shard(0);
    hello.mutable_hello()->set_reply_part_bytes(absl::GetFlag(FLAGS_stream_part_bytes));
    hello.mutable_hello()->set_protocol_version(kSessionProtocolVersion);
    if (shared_memory) {
      const uint64_t bytes =
          SharedAreaBytes(partition.shard_bytes(0), partition.shard_blocks(0).size());
      absl::StatusOr<std::unique_ptr<SharedRegion>> r = SharedRegion::Create(bytes, bytes);
      if (!r.ok()) {
        error_ = std::string(r.status().message());
        return;
      }
      region_ = *std::move(r);
      hello.mutable_hello()->set_shm_name(region_->name());
      hello.mutable_hello()->set_shm_size(region_->size());
      hello.mutable_hello()->set_shm_nonce(std::string(region_->nonce()));
    }
    ok_ = stream_->Write(hello) && stream_->Read(&reply_) && reply_.code() == 0;
    if (ok_ && region_ != nullptr) {
      region_->Unlink();
      if (!reply_.shm_accepted()) {
        error_ = "the server declined shared memory: " + reply_.shm_detail();
        ok_ = false;
      }
    }
    grads_.assign(partition.total_elements(), 1e-3f);
    params_.assign(partition.total_elements(), 0.0f);
    for (uint32_t id : partition.shard_blocks(0)) payload_bytes_ += partition.blocks()[id].num_elements * 4;
  }

  ~BenchClient() {
    if (stream_ != nullptr) {
      stream_->WritesDone();
      stream_->Finish().ok();
    }
  }

  bool ok() const { return ok_; }
  int64_t payload_bytes() const { return payload_bytes_; }
  const std::string& error() const { return error_; }

  // One push of every block; adds phase times to `ph`.
  bool Push(Phases* ph) {
    const auto t0 = Clock::now();
    const std::vector<uint32_t>& ids = partition_.shard_blocks(0);
    push_.set_request_id(++id_);
    tessera::v1::PushRequest* push = push_.mutable_push();
    push->set_step(step_++);
    push->set_return_parameters(false);
    uint64_t used = 0;
    // As the worker does: into the region when there is one, else into a
    // buffer that gRPC sends from without a serialisation copy.
    absl::Span<char> lent;
    if (region_ == nullptr) {
      lent = serializer_.Allocate(payload_bytes_ + 64 * ids.size());
      zero_copy_.resize(ids.size());
      lent_.resize(ids.size());
    }
    for (size_t i = 0; i < ids.size(); ++i) {
      const BlockInfo& b = partition_.blocks()[ids[i]];
      tessera::v1::TensorBlock* tb = static_cast<int>(i) < push->blocks_size()
                                         ? push->mutable_blocks(i)
                                         : push->add_blocks();
      tb->set_block_id(b.id);
      tb->set_dtype(tessera::v1::F32);
      const absl::Span<const float> g =
          absl::MakeConstSpan(grads_).subspan(b.flat_offset, b.num_elements);
      if (region_ != nullptr) {
        EncodeBlockPayload(tessera::v1::F32, g, region_->request_area(), &used, tb);
      } else {
        // Encoded part by part as the push is written, as workers do.
        const absl::Span<char> out = lent.subspan(used, g.size() * sizeof(float));
        used = AlignPayload(used + out.size());
        zero_copy_[i] = absl::string_view(out.data(), out.size());
        lent_[i] = {g, out};
        tb->clear_data();
      }
    }
    const auto t1 = Clock::now();
    bool written;
    if (region_ != nullptr) {
      written = stream_->Write(push_);
    } else {
      SessionStream::Parts parts;
      parts.min_bytes = absl::GetFlag(FLAGS_stream_part_bytes);
      parts.before_part = [this](int b, int e) {
        for (int i = b; i < e; ++i) EncodeTo(tessera::v1::F32, lent_[i].first, lent_[i].second);
        return true;
      };
      written = stream_->WritePush(push_, zero_copy_, &serializer_, parts);
    }
    if (!written) return Fail("push: stream closed on write");
    const auto t2 = Clock::now();
    if (!stream_->Read(&reply_)) return Fail("push: stream closed on read");
    const auto t3 = Clock::now();
    if (reply_.code() != 0) return Fail("push: " + reply_.message());
    ph->encode += Seconds(t1 - t0);
    ph->write += Seconds(t2 - t1);
    ph->read += Seconds(t3 - t2);
    return true;
  }

  // One pull of every block, decoded into the parameter buffer.
  bool Pull(Phases* ph) {
    const auto t0 = Clock::now();
    pull_.set_request_id(++id_);
    pull_.mutable_pull()->set_step(0);
    if (!stream_->Write(pull_)) return Fail("pull: stream closed on write");
    const auto t1 = Clock::now();
    // In parts (as workers take them), each decoded while the next comes:
    // the decoding of all but the last part counts as read time.
    while (true) {
      if (!stream_->Read(&reply_)) return Fail("pull: stream closed on read");
      if (reply_.code() != 0) return Fail("pull: " + reply_.message());
      if (!reply_.pull().more_parts()) break;
      if (!DecodeReply()) return false;
    }
    const auto t2 = Clock::now();
    if (!DecodeReply()) return false;
    const auto t3 = Clock::now();
    ph->write += Seconds(t1 - t0);
    ph->read += Seconds(t2 - t1);
    ph->encode += Seconds(t3 - t2);
    return true;
  }

 private:
  bool DecodeReply() {
    for (const tessera::v1::TensorBlock& tb : reply_.pull().blocks()) {
      const BlockInfo& b = partition_.blocks()[tb.block_id()];
      absl::StatusOr<absl::string_view> payload = BlockPayload(
          tb, region_ != nullptr ? region_->reply_area() : absl::Span<const char>());
      if (!payload.ok()) return Fail("pull: " + std::string(payload.status().message()));
      absl::Status s = DecodeF32(tb.dtype(), *payload,
                                 absl::MakeSpan(params_).subspan(b.flat_offset, b.num_elements));
      if (!s.ok()) return Fail("pull: " + std::string(s.message()));
    }
    return true;
  }

  bool Fail(const std::string& what) {
    error_ = what;
    return false;
  }

  const Partition& partition_;
  std::shared_ptr<grpc::Channel> channel_;
  grpc::ClientContext ctx_;
  std::unique_ptr<SessionStream> stream_;
  PushSerializer serializer_;
  std::vector<absl::string_view> zero_copy_;
  std::vector<std::pair<absl::Span<const float>, absl::Span<char>>> lent_;
  ClientMessage push_;
  ClientMessage pull_;
  ServerMessage reply_;
  std::unique_ptr<SharedRegion> region_;
  std::vector<std::string> parked_;
  std::vector<float> grads_;
  std::vector<float> params_;
  uint64_t id_ = 0;
  int64_t step_ = 0;
  int64_t payload_bytes_ = 0;
  bool ok_ = false;
  std::string error_;
};

// Runs warm-up then `rounds` timed rounds of `ops` operations.
absl::StatusOr<DirectionResult> TimeDirection(BenchClient* client, bool push, int ops,
                                              int rounds, pid_t server_pid) {
  DirectionResult r;
  r.ops_per_round = ops;
  Phases scratch;
  for (int i = 0; i < std::max(2, ops / 2); ++i) {  // warm-up: buffers, TCP windows
    if (!(push ? client->Push(&scratch) : client->Pull(&scratch))) {
      return absl::InternalError(client->error());
    }
  }
  const Usage client0 = SelfUsage();
  const Usage server0 = ProcessUsage(server_pid);
  for (int round = 0; round < rounds; ++round) {
    const auto start = Clock::now();
    for (int i = 0; i < ops; ++i) {
      if (!(push ? client->Push(&r.phases) : client->Pull(&r.phases))) {
        return absl::InternalError(client->error());
      }
    }
    const double wall = Seconds(Clock::now() - start);
    r.total_wall_s += wall;
    r.total_bytes += client->payload_bytes() * ops;
    r.gbps.push_back(static_cast<double>(client->payload_bytes()) * ops / wall / 1e9);
  }
  const Usage client1 = SelfUsage();
  const Usage server1 = ProcessUsage(server_pid);
  r.client_cpu_s = client1.cpu_s - client0.cpu_s;
  r.server_cpu_s = server1.cpu_s - server0.cpu_s;
  r.client_minflt = client1.minflt - client0.minflt;
  r.server_minflt = server1.minflt - server0.minflt;
  return r;
}

std::string DirectionJson(const DirectionResult& r, bool push) {
  const double ops = static_cast<double>(r.ops_per_round) * r.gbps.size();
  const double gb = r.total_bytes / 1e9;
  const char* encode_name = push ? "encode_ms" : "decode_ms";
  const double page = static_cast<double>(sysconf(_SC_PAGESIZE));
  return absl::StrCat(
      "{\"gbps_median\": ", absl::StrFormat("%.4f", Median(r.gbps)),
      ", \"gbps_min\": ", absl::StrFormat("%.4f", *std::min_element(r.gbps.begin(), r.gbps.end())),
      ", \"gbps_max\": ", absl::StrFormat("%.4f", *std::max_element(r.gbps.begin(), r.gbps.end())),
      ", \"gbps_rounds\": ", JsonArray(r.gbps), ", \"ops_per_round\": ", r.ops_per_round,
      ", \"ms_per_op\": ", absl::StrFormat("%.4f", 1e3 * r.total_wall_s / ops),
      ", \"phases_ms_per_op\": {\"", encode_name, "\": ",
      absl::StrFormat("%.4f", 1e3 * r.phases.encode / ops),
      ", \"write_ms\": ", absl::StrFormat("%.4f", 1e3 * r.phases.write / ops),
      ", \"read_ms\": ", absl::StrFormat("%.4f", 1e3 * r.phases.read / ops), "}",
      ", \"client_cpu_s_per_gb\": ", absl::StrFormat("%.4f", r.client_cpu_s / gb),
      ", \"server_cpu_s_per_gb\": ", absl::StrFormat("%.4f", r.server_cpu_s / gb),
      ", \"client_faulted_bytes_per_payload_byte\": ",
      absl::StrFormat("%.3f", r.client_minflt * page / r.total_bytes),
      ", \"server_faulted_bytes_per_payload_byte\": ",
      absl::StrFormat("%.3f", r.server_minflt * page / r.total_bytes),
      ", \"cpu_cores_busy\": ",
      absl::StrFormat("%.3f", (r.client_cpu_s + r.server_cpu_s) / r.total_wall_s), "}");
}

// ---------------------------------------------------------------------------
// In-process floors: memcpy and protobuf.
// ---------------------------------------------------------------------------

template <typename Fn>
double MedianSeconds(int reps, Fn&& fn) {
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto a = Clock::now();
    fn();
    t.push_back(Seconds(Clock::now() - a));
  }
  return Median(t);
}

int RepsFor(int64_t bytes) {
  return static_cast<int>(std::clamp<int64_t>((int64_t{256} << 20) / bytes, 5, 101));
}

// memcpy between two warm (already touched) buffers and into freshly mapped
// pages (mmap + page faults + munmap per copy). GB/s of payload, i.e. size
// over time (bytes read + written are twice that).
std::string MemcpyJson(int64_t bytes) {
  std::vector<char> src(bytes, 1), dst(bytes, 2);
  const int reps = RepsFor(bytes);
  std::memcpy(dst.data(), src.data(), bytes);
  const double warm = MedianSeconds(reps, [&] {
    std::memcpy(dst.data(), src.data(), bytes);
    asm volatile("" : : "r"(dst.data()) : "memory");
  });
  const double fresh = MedianSeconds(reps, [&] {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    std::memcpy(p, src.data(), bytes);
    asm volatile("" : : "r"(p) : "memory");
    munmap(p, bytes);
  });
  return absl::StrCat("{\"warm_gbps\": ", absl::StrFormat("%.4f", bytes / warm / 1e9),
                      ", \"fresh_mmap_gbps\": ", absl::StrFormat("%.4f", bytes / fresh / 1e9),
                      "}");
}

// CPU-only costs of the push message: EncodeF32 into the reused request,
// SerializeToString into a reused string (the copy gRPC makes into its
// slices), ParseFromString into a reused ClientMessage (what the server
// does) and into a reused bare PushRequest, with the page faults each
// parse takes, and AllFinite over the payload (the server's validation
// pass).
std::string ProtoCostJson(const Partition& partition) {
  std::vector<float> grads(partition.total_elements(), 1e-3f);
  ClientMessage msg;
  int64_t bytes = 0;
  auto encode = [&] {
    tessera::v1::PushRequest* push = msg.mutable_push();
    int i = 0;
    for (uint32_t id : partition.shard_blocks(0)) {
      const BlockInfo& b = partition.blocks()[id];
      tessera::v1::TensorBlock* tb = i < push->blocks_size() ? push->mutable_blocks(i) : push->add_blocks();
      ++i;
      tb->set_block_id(b.id);
      tb->set_dtype(tessera::v1::F32);
      EncodeF32(absl::MakeConstSpan(grads).subspan(b.flat_offset, b.num_elements),
                tb->mutable_data());
    }
  };
  encode();
  for (const auto& tb : msg.push().blocks()) bytes += tb.data().size();
  const int reps = RepsFor(bytes);
  const double t_encode = MedianSeconds(reps, encode);
  std::string wire;
  msg.SerializeToString(&wire);
  const double t_serialize = MedianSeconds(reps, [&] { msg.SerializeToString(&wire); });
  ClientMessage parsed;
  parsed.ParseFromString(wire);
  const double faults0 = SelfUsage().minflt;
  const double t_parse = MedianSeconds(reps, [&] {
    if (!parsed.ParseFromString(wire)) std::abort();
  });
  const double parse_faulted =
      (SelfUsage().minflt - faults0) * sysconf(_SC_PAGESIZE) / (static_cast<double>(bytes) * reps);
  // The same payload parsed as a bare PushRequest: ClientMessage holds the
  // push in a oneof, and Clear() deletes a oneof's message, so a reused
  // ClientMessage does not keep its blocks' buffers; a reused PushRequest
  // does.
  std::string push_wire;
  msg.push().SerializeToString(&push_wire);
  tessera::v1::PushRequest push_parsed;
  push_parsed.ParseFromString(push_wire);
  const double push_faults0 = SelfUsage().minflt;
  const double t_parse_push = MedianSeconds(reps, [&] {
    if (!push_parsed.ParseFromString(push_wire)) std::abort();
  });
  const double push_parse_faulted = (SelfUsage().minflt - push_faults0) *
                                    sysconf(_SC_PAGESIZE) / (static_cast<double>(bytes) * reps);
  bool finite = true;
  const double t_finite = MedianSeconds(reps, [&] {
    for (const auto& tb : parsed.push().blocks()) {
      finite &= AllFinite({reinterpret_cast<const float*>(tb.data().data()), tb.data().size() / 4});
    }
  });
  if (!finite) std::abort();
  auto g = [&](double t) { return absl::StrFormat("%.4f", bytes / t / 1e9); };
  return absl::StrCat("{\"encode_gbps\": ", g(t_encode), ", \"serialize_gbps\": ", g(t_serialize),
                      ", \"parse_reused_gbps\": ", g(t_parse),
                      ", \"parse_reused_faulted_bytes_per_payload_byte\": ",
                      absl::StrFormat("%.3f", parse_faulted),
                      ", \"parse_push_request_only_gbps\": ", g(t_parse_push),
                      ", \"parse_push_request_only_faulted_bytes_per_payload_byte\": ",
                      absl::StrFormat("%.3f", push_parse_faulted),
                      ", \"all_finite_gbps\": ", g(t_finite), "}");
}

// ---------------------------------------------------------------------------

int Main() {
  if (absl::GetFlag(FLAGS_apply_threads) < 0) {
    std::cerr << "transport_bench: --apply_threads=" << absl::GetFlag(FLAGS_apply_threads)
              << ": must be 0 (the server's default) or more\n";
    return 1;
  }
  std::string bin_dir = absl::GetFlag(FLAGS_bin_dir);
  if (bin_dir.empty()) bin_dir = ThisExecutableDir();
  const std::string server_bin = bin_dir + "/tessera-server";
  if (access(server_bin.c_str(), X_OK) != 0) {
    std::cerr << "transport_bench: " << server_bin
              << " not found or not executable (set --bin_dir)\n";
    return 1;
  }
  std::vector<int64_t> sizes;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_sizes_mib), ',', absl::SkipEmpty())) {
    int64_t v;
    if (!absl::SimpleAtoi(s, &v) || v < 1 || v > 64) {
      std::cerr << "transport_bench: --sizes_mib: each size must be in [1, 64], got '" << s << "'\n";
      return 1;
    }
    sizes.push_back(v);
  }
  const int rounds = std::max(1, absl::GetFlag(FLAGS_rounds));
  const int64_t block_bytes = absl::GetFlag(FLAGS_block_bytes);
  char dir_template[] = "/tmp/tessera-transport-bench-XXXXXX";
  if (mkdtemp(dir_template) == nullptr) {
    std::cerr << "transport_bench: mkdtemp failed\n";
    return 1;
  }
  const std::string dir = dir_template;
  double load[3] = {0, 0, 0};
  getloadavg(load, 3);

  const std::string transport = absl::GetFlag(FLAGS_transport);
  if (transport != "tcp" && transport != "unix" && transport != "shm") {
    std::cerr << "transport_bench: --transport must be tcp, unix or shm, not '" << transport
              << "'\n";
    return 2;
  }
  const bool unix_socket = transport == "unix";
  absl::StatusOr<SocketTuning> tuning = BenchTuning();
  if (!tuning.ok()) {
    std::cerr << "transport_bench: " << tuning.status().message() << "\n";
    return 2;
  }
  // The algorithm the TCP connections of this run use (a Unix-domain
  // socket has none).
  std::string tcp_congestion = "none";
  if (!unix_socket) {
    tcp_congestion = ForTarget(*tuning, "127.0.0.1:1").tcp_congestion;
    if (tcp_congestion.empty()) {
      std::ifstream in("/proc/sys/net/ipv4/tcp_congestion_control");
      std::string system;
      in >> system;
      tcp_congestion = absl::StrCat("system: ", system);
    }
  }
  std::vector<std::string> size_docs;
  for (int64_t mib : sizes) {
    const std::string job_path = absl::StrCat(dir, "/job-", mib, ".textproto");
    if (!WriteFile(job_path, JobText(mib, block_bytes))) {
      std::cerr << "transport_bench: cannot write " << job_path << "\n";
      return 1;
    }
    absl::StatusOr<tessera::v1::JobSpec> job = LoadJob(job_path, {});
    if (!job.ok()) {
      std::cerr << "transport_bench: " << job.status() << "\n";
      return 1;
    }
    absl::StatusOr<ModelSpec> model = ParseModelSpec(job->model(), LossKind::kMeanSquaredError);
    absl::StatusOr<Partition> partition =
        model.ok() ? Partition::Create(*model, 1, job->block_bytes())
                   : absl::StatusOr<Partition>(model.status());
    if (!partition.ok()) {
      std::cerr << "transport_bench: " << partition.status() << "\n";
      return 1;
    }
    const int64_t bytes = partition->total_elements() * 4;
    const int ops = static_cast<int>(
        std::max<int64_t>(4, (absl::GetFlag(FLAGS_round_mib) << 20) / bytes));

    struct Target {
      std::string name;
      std::vector<std::string> argv;
    };
    // A Unix-domain socket has no port: the server still writes a port file
    // (gRPC reports 1), which only tells the bench it is listening.
    auto address = [&](const std::string& name) {
      return unix_socket ? absl::StrCat("unix:", dir, "/", name, "-", mib, ".sock")
                         : std::string("127.0.0.1:0");
    };
    std::vector<Target> targets = {
        {"tessera", {server_bin, "--job=" + job_path, "--shard=0",
                     "--listen=" + address("tessera")}}};
    if (absl::GetFlag(FLAGS_noop_baseline) && transport != "shm") {
      targets.push_back({"noop_grpc", {ThisExecutableDir() + "/transport_bench",
                                       "--job=" + job_path, "--listen=" + address("noop_grpc")}});
    }
    std::vector<std::string> target_docs;
    for (const Target& t : targets) {
      const std::string port_file = absl::StrCat(dir, "/", t.name, "-", mib, ".port");
      std::vector<std::string> argv = t.argv;
      if (t.name == "tessera" && absl::GetFlag(FLAGS_apply_threads) > 0) {
        argv.push_back(absl::StrCat("--apply_threads=", absl::GetFlag(FLAGS_apply_threads)));
      }
      if (!absl::GetFlag(FLAGS_tcp_congestion).empty()) {
        argv.push_back("--tcp_congestion=" + absl::GetFlag(FLAGS_tcp_congestion));
      }
      argv.push_back(t.name == "tessera" ? "--port_file=" + port_file : "--serve_noop=" + port_file);
      absl::StatusOr<ServerChild> server =
          StartServer(argv, port_file, absl::StrCat(dir, "/", t.name, "-", mib, ".log"));
      if (!server.ok()) {
        std::cerr << "transport_bench: " << server.status() << "\n";
        return 1;
      }
      std::string doc;
      {
        const std::string target = unix_socket
                                       ? t.argv.back().substr(std::string("--listen=").size())
                                       : absl::StrCat("127.0.0.1:", server->port);
        BenchClient client(target, *partition, JobHash(*job), transport == "shm", *tuning);
        if (!client.ok()) {
          std::cerr << "transport_bench: Hello to " << t.name << " failed " << client.error()
                    << "\n";
          return 1;
        }
        std::cerr << absl::StrFormat("%s %d MiB (%d blocks): %d ops x %d rounds per direction\n",
                                     t.name, mib, partition->shard_blocks(0).size(), ops, rounds);
        std::vector<std::string> parts;
        for (bool push : {true, false}) {
          const char* name = push ? "push" : "pull";
          if (!absl::StrContains(absl::GetFlag(FLAGS_directions), name)) continue;
          absl::StatusOr<DirectionResult> r =
              TimeDirection(&client, push, ops, rounds, server->process->pid());
          if (!r.ok()) {
            std::cerr << "transport_bench: " << t.name << " " << r.status() << "\n";
            return 1;
          }
          std::cerr << absl::StrFormat("  %s %.3f GB/s (median of %d rounds)\n", name,
                                       Median(r->gbps), rounds);
          parts.push_back(absl::StrCat("\"", name, "\": ", DirectionJson(*r, push)));
        }
        doc = absl::StrCat("\"", t.name, "\": {", absl::StrJoin(parts, ", "), "}");
      }
      server->process->Stop(absl::Seconds(5));
      target_docs.push_back(doc);
    }
    std::string floors;
    if (absl::GetFlag(FLAGS_floors)) {
      std::cerr << absl::StrFormat("memcpy and protobuf floors %d MiB\n", mib);
      floors = absl::StrCat(", \"memcpy\": ", MemcpyJson(bytes),
                            ", \"protobuf_cpu\": ", ProtoCostJson(*partition));
    }
    size_docs.push_back(absl::StrCat(
        "{\"size_mib\": ", mib, ", \"payload_bytes\": ", bytes,
        ", \"blocks\": ", partition->shard_blocks(0).size(), ", \"model\": \"", job->model(),
        "\", ", absl::StrJoin(target_docs, ", "), floors, "}"));
  }
  double load_end[3] = {0, 0, 0};
  getloadavg(load_end, 3);
  const std::string doc = absl::StrCat(
      "{\"benchmark\": \"transport\", \"units\": \"GB/s = payload bytes / wall seconds / 1e9\", ",
      "\"transport\": \"", transport, "\", ",
      "\"tcp_congestion\": \"", tcp_congestion, "\", ",
      "\"block_bytes\": ", block_bytes,
      ", \"stream_part_bytes\": ", absl::GetFlag(FLAGS_stream_part_bytes), ", \"rounds\": ", rounds,
      ", \"load_average_start\": ", JsonArray({load[0], load[1], load[2]}),
      ", \"load_average_end\": ", JsonArray({load_end[0], load_end[1], load_end[2]}),
      ", \"sizes\": [\n  ", absl::StrJoin(size_docs, ",\n  "), "\n]}\n");
  const std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty()) {
    std::cout << doc;
  } else if (!WriteFile(out, doc)) {
    std::cerr << "transport_bench: cannot write " << out << "\n";
    return 1;
  }
  // Best effort: the job files, port files and logs of this run.
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
  return 0;
}

}  // namespace
}  // namespace tessera

int main(int argc, char** argv) {
  tessera::TuneAllocatorForLargeMessages();
  absl::SetProgramUsageMessage(
      "Push/pull throughput through a real tessera-server on 127.0.0.1, beside memcpy "
      "and a no-op gRPC server. Prints one JSON document.");
  absl::ParseCommandLine(argc, argv);
  if (!absl::GetFlag(FLAGS_serve_noop).empty()) {
    return tessera::ServeNoop(absl::GetFlag(FLAGS_job), absl::GetFlag(FLAGS_listen),
                              absl::GetFlag(FLAGS_serve_noop));
  }
  return tessera::Main();
}
