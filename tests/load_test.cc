// Load on the real server binary: sustained pushes and pulls from several
// streams (no errors, resident memory and descriptors flat after warm-up),
// and overload (streams beyond the limit shed at once, service back to its
// baseline latency right after). TESSERA_LOAD_SECONDS sets the sustained
// phase (default 20; `make chaos` runs it for minutes).

#include <grpcpp/grpcpp.h>

#include <dirent.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <fstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/job_spec.h"
#include "common/model_spec.h"
#include "common/partition.h"
#include "common/protocol.h"
#include "common/tensor_codec.h"
#include "gtest/gtest.h"
#include "proto/tessera.grpc.pb.h"
#include "tests/cluster_util.h"

namespace tessera {
namespace {

using testing_util::NewTempDir;
using testing_util::ServerProcess;
using testing_util::WriteFile;
using tessera::v1::ClientMessage;
using tessera::v1::ServerMessage;

// 1 MiB of parameters in 4 blocks; 8 workers so 8 streams may push.
constexpr char kJob[] = R"(
name: "load"
model: "linear:262143-1"
loss: MEAN_SQUARED_ERROR
data { format: SYNTHETIC_REGRESSION num_samples: 100 validation_fraction: 0.2 }
optimizer { type: SGD learning_rate: 0.0001 }
consistency { mode: ASYNC }
batch_size: 4
epochs: 1
num_shards: 1
num_workers: 8
block_bytes: 262144
)";

int64_t ProcStatusKb(pid_t pid, const std::string& key) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  for (std::string line; std::getline(in, line);) {
    if (absl::StartsWith(line, key)) {
      std::vector<std::string> f = absl::StrSplit(line, ' ', absl::SkipWhitespace());
      int64_t v = 0;
      if (f.size() >= 2 && absl::SimpleAtoi(f[1], &v)) return v;
    }
  }
  return -1;
}

int OpenFds(pid_t pid) {
  int n = 0;
  if (DIR* d = opendir(absl::StrCat("/proc/", pid, "/fd").c_str())) {
    while (dirent* e = readdir(d)) n += e->d_name[0] != '.';
    closedir(d);
  }
  return n;
}

class LoadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = NewTempDir("load");
    WriteFile(dir_ + "/job.textproto", kJob);
    auto job = LoadJob(dir_ + "/job.textproto", {});
    ASSERT_TRUE(job.ok()) << job.status();
    hash_ = JobHash(*job);
    auto model = ParseModelSpec(job->model(), LossKind::kMeanSquaredError);
    ASSERT_TRUE(model.ok());
    partition_ = std::make_unique<Partition>(*Partition::Create(*model, 1, job->block_bytes()));
    server_ = ServerProcess::Start(dir_, {"--job=" + dir_ + "/job.textproto", "--shard=0",
                                          "--max_sessions=8"});
    ASSERT_NE(server_, nullptr);
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    channel_ = grpc::CreateCustomChannel(server_->address(), grpc::InsecureChannelCredentials(), args);
    stub_ = tessera::v1::ParameterService::NewStub(channel_);
  }

  ClientMessage Push(int64_t step) const {
    ClientMessage m;
    m.mutable_push()->set_step(step);
    m.mutable_push()->set_return_parameters(true);
    for (const BlockInfo& b : partition_->blocks()) {
      auto* tb = m.mutable_push()->add_blocks();
      tb->set_block_id(b.id);
      tb->set_dtype(tessera::v1::F32);
      std::vector<float> g(b.num_elements, 0.5f);
      EncodeF32(g, tb->mutable_data());
    }
    return m;
  }

  // Opens a stream and says Hello as `worker`; returns the stream or null
  // with the status in *refused.
  struct Stream {
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientReaderWriter<ClientMessage, ServerMessage>> rw;
  };
  std::unique_ptr<Stream> Open(int worker, grpc::Status* refused) {
    auto s = std::make_unique<Stream>();
    s->rw = stub_->Session(&s->ctx);
    ClientMessage hello;
    hello.mutable_hello()->set_worker_id(worker);
    hello.mutable_hello()->set_incarnation(1);
    hello.mutable_hello()->set_job_hash(hash_);
    hello.mutable_hello()->set_protocol_version(kSessionProtocolVersion);
    ServerMessage reply;
    if (s->rw->Write(hello) && s->rw->Read(&reply) && reply.code() == 0) return s;
    s->rw->WritesDone();
    *refused = s->rw->Finish();
    return nullptr;
  }

  std::string dir_;
  uint64_t hash_ = 0;
  std::unique_ptr<Partition> partition_;
  std::unique_ptr<ServerProcess> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<tessera::v1::ParameterService::Stub> stub_;
};

TEST_F(LoadTest, SustainedPushPullKeepsMemoryAndDescriptorsFlat) {
  // The server's heap settles 35-40 s into the load (glibc keeps freed
  // blocks; one arena): a 150 s run grew to 48,000 kB by second 35 and
  // then by 1.3% in the remaining 115 s. The first half of the run is
  // warm-up, so it must be longer than that; at 40 s a run compared
  // seconds 20-30 with 30-40 and failed now and then (5.2%).
  int seconds = 80;
  if (const char* env = std::getenv("TESSERA_LOAD_SECONDS")) {
    ASSERT_TRUE(absl::SimpleAtoi(env, &seconds) && seconds > 0)
        << "TESSERA_LOAD_SECONDS must be a positive number of seconds, got '" << env << "'";
  }
  constexpr int kStreams = 4;
  std::atomic<bool> stop{false};
  std::atomic<int64_t> ok{0}, errors{0};
  std::vector<std::thread> threads;
  for (int w = 0; w < kStreams; ++w) {
    threads.emplace_back([&, w] {
      grpc::Status refused;
      auto s = Open(w, &refused);
      if (s == nullptr) {
        ++errors;
        return;
      }
      const ClientMessage push = Push(0);
      ClientMessage m = push;
      ServerMessage reply;
      for (int64_t step = 0; !stop.load(); ++step) {
        m.mutable_push()->set_step(step);
        if (!s->rw->Write(m) || !s->rw->Read(&reply) || reply.code() != 0) {
          ++errors;
          return;
        }
        ++ok;
      }
      s->rw->WritesDone();
      s->rw->Finish().ok();
    });
  }
  const pid_t pid = server_->process()->pid();
  std::vector<int64_t> rss;
  std::vector<int> fds;
  for (int t = 0; t < seconds; ++t) {
    absl::SleepFor(absl::Seconds(1));
    rss.push_back(ProcStatusKb(pid, "VmRSS:"));
    fds.push_back(OpenFds(pid));
  }
  stop = true;
  for (auto& t : threads) t.join();
  const size_t warm = rss.size() / 4;  // the first quarter is warm-up
  std::cout << "RSS kB per second:";
  for (int64_t r : rss) std::cout << " " << r;
  std::cout << "\n";
  // Drift: the lowest resident size of the last quarter against the lowest
  // of the quarter after warm-up. Single samples swing with the buffers of
  // requests in flight; the floor between them rises only with a leak.
  auto floor_of = [&](size_t from, size_t to) {
    return static_cast<double>(*std::min_element(rss.begin() + from, rss.begin() + to));
  };
  const size_t q = rss.size() / 4;
  // The first half is warm-up (buffer pools and the allocator settle).
  const double early = floor_of(2 * q, 3 * q), late = floor_of(rss.size() - q, rss.size());
  const double drift = (late - early) / early;
  std::cout << "requests " << ok.load() << " (" << ok.load() / seconds << "/s, "
            << ok.load() * 2.0 / seconds << " MiB/s each way), errors " << errors.load()
            << ", RSS after warm-up " << early << " kB, at the end " << late << " kB, drift "
            << drift * 100 << "%, fds " << fds[warm] << " -> " << fds.back() << "\n";
  EXPECT_EQ(errors.load(), 0);
  EXPECT_GT(ok.load(), seconds * 10);
  EXPECT_LE(drift, 0.05) << "resident memory grew by more than 5% after warm-up";
  for (size_t i = warm; i < fds.size(); ++i) EXPECT_EQ(fds[i], fds[warm]) << "second " << i;
}

TEST_F(LoadTest, OverloadIsShedQuicklyAndServiceRecovers) {
  // Baseline latency of one fused push-pull.
  grpc::Status refused;
  auto probe = Open(0, &refused);
  ASSERT_NE(probe, nullptr);
  auto timed_push = [&](int64_t step) {
    ClientMessage m = Push(step);
    ServerMessage reply;
    const absl::Time t0 = absl::Now();
    EXPECT_TRUE(probe->rw->Write(m) && probe->rw->Read(&reply));
    EXPECT_EQ(reply.code(), 0);
    return absl::Now() - t0;
  };
  absl::Duration baseline = absl::InfiniteDuration();
  for (int i = 0; i < 5; ++i) baseline = std::min(baseline, timed_push(i));

  // Four times the limit of 8 streams: 7 more fit, the rest are shed.
  std::vector<std::unique_ptr<Stream>> open;
  int shed = 0;
  absl::Duration slowest_refusal;
  for (int i = 0; i < 32; ++i) {
    const absl::Time t0 = absl::Now();
    grpc::Status status;
    auto s = Open(1 + i % 7, &status);
    if (s != nullptr) {
      open.push_back(std::move(s));
    } else {
      EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
      slowest_refusal = std::max(slowest_refusal, absl::Now() - t0);
      ++shed;
    }
  }
  EXPECT_EQ(open.size(), 7u);
  EXPECT_EQ(shed, 25);
  std::cout << "shed " << shed << " streams, slowest refusal "
            << absl::FormatDuration(slowest_refusal) << ", baseline push "
            << absl::FormatDuration(baseline) << "\n";
  EXPECT_LT(slowest_refusal, absl::Seconds(2)) << "excess work must be refused, not queued";
  for (auto& s : open) {
    s->rw->WritesDone();
    s->rw->Finish().ok();
  }
  open.clear();
  // Back to (near) baseline latency within 10 s.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  absl::Duration latest;
  int64_t step = 100;
  do {
    latest = timed_push(step++);
  } while (latest > baseline * 3 + absl::Milliseconds(5) && absl::Now() < deadline);
  EXPECT_LE(latest, baseline * 3 + absl::Milliseconds(5));
  probe->rw->WritesDone();
  probe->rw->Finish().ok();
}

}  // namespace
}  // namespace tessera
