// The real tessera-server binary on 127.0.0.1: bad requests over gRPC,
// exactly-once apply, bad job files and port clashes.

#include <grpcpp/grpcpp.h>
#include <signal.h>

#include <thread>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "common/job_spec.h"
#include "common/model_spec.h"
#include "common/partition.h"
#include "common/protocol.h"
#include "common/shared_region.h"
#include "common/tensor_codec.h"
#include "gtest/gtest.h"
#include "proto/tessera.grpc.pb.h"
#include "tests/cluster_util.h"
#include "worker/grpc_parameter_client.h"

namespace tessera {
namespace {

using testing_util::Bin;
using testing_util::NewTempDir;
using testing_util::RunProgram;
using testing_util::RunResult;
using testing_util::ServerProcess;
using testing_util::WriteFile;
using tessera::v1::ClientMessage;
using tessera::v1::ServerMessage;

// The exact-sum workload: SGD with learning rate 1, so a push of all ones
// lowers every parameter by exactly 1.
constexpr char kExactSumJob[] = R"(
name: "exact-sum"
model: "linear:64-4"
loss: MEAN_SQUARED_ERROR
data { format: SYNTHETIC_REGRESSION num_samples: 100 validation_fraction: 0.2 }
optimizer { type: SGD learning_rate: 1.0 }
consistency { mode: ASYNC }
batch_size: 4
epochs: 1
num_shards: 1
num_workers: 1
block_bytes: 256
)";

class ServerProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = NewTempDir("server");
    job_path_ = dir_ + "/job.textproto";
    WriteFile(job_path_, kExactSumJob);
    auto job = LoadJob(job_path_, {});
    ASSERT_TRUE(job.ok()) << job.status();
    job_ = *job;
    auto model = ParseModelSpec(job_.model(), LossKind::kMeanSquaredError);
    ASSERT_TRUE(model.ok());
    auto partition = Partition::Create(*model, 1, job_.block_bytes());
    ASSERT_TRUE(partition.ok());
    partition_ = std::make_unique<Partition>(*std::move(partition));
    server_ = ServerProcess::Start(dir_, {"--job=" + job_path_, "--shard=0"});
    ASSERT_NE(server_, nullptr);
    channel_ = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
    stub_ = tessera::v1::ParameterService::NewStub(channel_);
  }

  tessera::v1::ShardStatsResponse Stats() {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    tessera::v1::ShardStatsResponse out;
    grpc::Status s = stub_->ShardStats(&ctx, {}, &out);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return out;
  }

  ClientMessage Push(int64_t step, float value) {
    ClientMessage m;
    m.mutable_push()->set_step(step);
    for (const BlockInfo& b : partition_->blocks()) {
      tessera::v1::TensorBlock* tb = m.mutable_push()->add_blocks();
      tb->set_block_id(b.id);
      tb->set_dtype(tessera::v1::F32);
      std::vector<float> v(b.num_elements, value);
      EncodeF32(v, tb->mutable_data());
    }
    return m;
  }

  std::string dir_;
  std::string job_path_;
  tessera::v1::JobSpec job_;
  std::unique_ptr<Partition> partition_;
  std::unique_ptr<ServerProcess> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<tessera::v1::ParameterService::Stub> stub_;
};

// One open Session stream.
class Session {
 public:
  // With `region`, the Hello offers it (the nonce may be overridden).
  Session(tessera::v1::ParameterService::Stub* stub, uint64_t job_hash, int64_t incarnation,
          const SharedRegion* region = nullptr, const std::string* nonce = nullptr,
          int64_t reply_part_bytes = 0, uint32_t protocol_version = kSessionProtocolVersion) {
    ctx_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    stream_ = stub->Session(&ctx_);
    ClientMessage hello;
    hello.mutable_hello()->set_worker_id(0);
    hello.mutable_hello()->set_incarnation(incarnation);
    hello.mutable_hello()->set_job_hash(job_hash);
    hello.mutable_hello()->set_shard(0);
    hello.mutable_hello()->set_reply_part_bytes(reply_part_bytes);
    hello.mutable_hello()->set_protocol_version(protocol_version);
    if (region != nullptr) {
      hello.mutable_hello()->set_shm_name(region->name());
      hello.mutable_hello()->set_shm_size(region->size());
      hello.mutable_hello()->set_shm_nonce(nonce != nullptr ? *nonce
                                                             : std::string(region->nonce()));
    }
    hello_ok_ = Send(hello, &hello_reply_);
  }
  const ServerMessage& hello_reply() const { return hello_reply_; }
  ~Session() {
    if (!finished_) Finish().ok();
  }
  bool Send(ClientMessage m, ServerMessage* reply) {
    m.set_request_id(++id_);
    return stream_->Write(m) && stream_->Read(reply);
  }
  // Writes `m` with the id given (parts of one push share an id).
  bool Write(ClientMessage m, uint64_t id) {
    m.set_request_id(id);
    return stream_->Write(m);
  }
  bool Read(ServerMessage* reply) { return stream_->Read(reply); }
  bool hello_ok() const { return hello_ok_; }
  grpc::Status Finish() {
    finished_ = true;
    stream_->WritesDone();
    return stream_->Finish();
  }

 private:
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReaderWriter<ClientMessage, ServerMessage>> stream_;
  uint64_t id_ = 0;
  ServerMessage hello_reply_;
  bool hello_ok_ = false;
  bool finished_ = false;
};

TEST_F(ServerProcessTest, ReplayedPushAppliedOnceExactSum) {
  const double before = Stats().param_sum();
  Session session(stub_.get(), JobHash(job_), 1);
  ASSERT_TRUE(session.hello_ok());
  const ClientMessage push = Push(0, 1.0f);
  int applied = 0;
  for (int i = 0; i < 10; ++i) {
    ServerMessage reply;
    ASSERT_TRUE(session.Send(push, &reply));
    ASSERT_EQ(reply.code(), 0) << reply.message();
    applied += reply.push().applied() ? 1 : 0;
  }
  EXPECT_EQ(applied, 1);
  const tessera::v1::ShardStatsResponse after = Stats();
  // 64*4 + 4 = 260 parameters, each lowered by 1 per applied push (up to
  // float rounding of each parameter, far below one push's 260).
  EXPECT_NEAR((before - after.param_sum()) / 260.0, 1.0, 1e-4);
  EXPECT_EQ(after.pushes_applied(), 1);
  EXPECT_EQ(after.pushes_duplicate(), 9);
}

// Blocks [begin, end) of `push` as one part (PushRequest.more_parts).
ClientMessage Part(const ClientMessage& push, int begin, int end, bool more) {
  ClientMessage part = push;
  auto* blocks = part.mutable_push()->mutable_blocks();
  blocks->DeleteSubrange(end, blocks->size() - end);
  blocks->DeleteSubrange(0, begin);
  part.mutable_push()->set_more_parts(more);
  return part;
}

TEST_F(ServerProcessTest, PushInPartsIsGatheredAndRepliedToOnce) {
  ASSERT_EQ(partition_->blocks().size(), 5u);
  const double before = Stats().param_sum();
  Session session(stub_.get(), JobHash(job_), 1);
  ASSERT_TRUE(session.hello_ok());
  const ClientMessage push = Push(0, 1.0f);
  ASSERT_TRUE(session.Write(Part(push, 0, 2, true), 7));
  ASSERT_TRUE(session.Write(Part(push, 2, 4, true), 7));
  // Nothing is applied before the last part.
  EXPECT_EQ(Stats().pushes_applied(), 0);
  EXPECT_DOUBLE_EQ(Stats().param_sum(), before);
  ASSERT_TRUE(session.Write(Part(push, 4, 5, false), 7));
  ServerMessage reply;
  ASSERT_TRUE(session.Read(&reply));
  EXPECT_EQ(reply.request_id(), 7u);
  ASSERT_EQ(reply.code(), 0) << reply.message();
  EXPECT_TRUE(reply.push().applied());
  EXPECT_NEAR((before - Stats().param_sum()) / 260.0, 1.0, 1e-4);

  // A resend in parts of the same step is a duplicate, as a whole push is.
  ASSERT_TRUE(session.Write(Part(push, 0, 3, true), 8));
  ASSERT_TRUE(session.Write(Part(push, 3, 5, false), 8));
  ASSERT_TRUE(session.Read(&reply));
  EXPECT_EQ(reply.request_id(), 8u);
  EXPECT_EQ(reply.code(), 0) << reply.message();
  EXPECT_FALSE(reply.push().applied());
  const tessera::v1::ShardStatsResponse stats = Stats();
  EXPECT_EQ(stats.pushes_applied(), 1);
  EXPECT_EQ(stats.pushes_duplicate(), 1);
}

// A worker that sets Hello.reply_part_bytes gets parameters in parts of
// whole blocks: the same blocks and bytes as in one message.
TEST_F(ServerProcessTest, ParametersComeInPartsWhenAskedFor) {
  Session whole(stub_.get(), JobHash(job_), 1);
  ASSERT_TRUE(whole.hello_ok());
  ServerMessage reply;
  ASSERT_TRUE(whole.Send(Push(0, 1.0f), &reply));
  ASSERT_EQ(reply.code(), 0) << reply.message();
  ClientMessage pull;
  pull.mutable_pull()->set_step(1);
  ServerMessage in_one;
  ASSERT_TRUE(whole.Send(pull, &in_one));
  ASSERT_EQ(in_one.code(), 0) << in_one.message();
  EXPECT_FALSE(in_one.pull().more_parts());
  ASSERT_EQ(in_one.pull().blocks_size(), 5);

  // 600 bytes: parts of three 256-byte blocks, then the rest (two blocks,
  // the last 16 bytes).
  Session parted(stub_.get(), JobHash(job_), 2, nullptr, nullptr, 600);
  ASSERT_TRUE(parted.hello_ok());
  for (int round = 0; round < 2; ++round) {  // the second reuses the buffers
    ASSERT_TRUE(parted.Write(pull, 20 + round));
    std::vector<int> sizes;
    std::map<uint32_t, std::string> blocks;
    do {
      ASSERT_TRUE(parted.Read(&reply));
      EXPECT_EQ(reply.request_id(), 20u + round);
      ASSERT_EQ(reply.code(), 0) << reply.message();
      EXPECT_EQ(reply.pull().version(), in_one.pull().version());
      sizes.push_back(reply.pull().blocks_size());
      for (const tessera::v1::TensorBlock& b : reply.pull().blocks()) {
        EXPECT_TRUE(blocks.emplace(b.block_id(), b.data()).second) << "block " << b.block_id();
      }
    } while (reply.pull().more_parts());
    EXPECT_EQ(sizes, (std::vector<int>{3, 2}));
    ASSERT_EQ(blocks.size(), 5u);
    for (const tessera::v1::TensorBlock& b : in_one.pull().blocks()) {
      EXPECT_EQ(blocks[b.block_id()], b.data()) << "block " << b.block_id();
    }
  }
}

TEST_F(ServerProcessTest, BrokenPushesInPartsAreRefusedAndChangeNothing) {
  const double before = Stats().param_sum();
  Session session(stub_.get(), JobHash(job_), 1);
  ASSERT_TRUE(session.hello_ok());
  const ClientMessage push = Push(0, 1.0f);
  ServerMessage reply;

  // A part that does not continue the push begun (another step).
  ClientMessage other_step = Part(push, 2, 5, true);
  other_step.mutable_push()->set_step(1);
  ASSERT_TRUE(session.Write(Part(push, 0, 2, true), 10));
  ASSERT_TRUE(session.Write(other_step, 10));
  ASSERT_TRUE(session.Read(&reply));
  EXPECT_EQ(reply.request_id(), 10u);
  EXPECT_EQ(reply.code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  EXPECT_NE(reply.message().find("does not continue"), std::string::npos) << reply.message();
  // Its remaining parts are dropped without a reply.
  ASSERT_TRUE(session.Write(Part(push, 4, 5, false), 10));

  // More blocks than the shard has.
  ASSERT_TRUE(session.Write(Part(push, 0, 5, true), 11));
  ASSERT_TRUE(session.Write(Part(push, 0, 1, false), 11));
  ASSERT_TRUE(session.Read(&reply));
  EXPECT_EQ(reply.request_id(), 11u);
  EXPECT_NE(reply.message().find("more than the shard's 5 blocks"), std::string::npos)
      << reply.message();

  // Another request in the middle of a push in parts.
  ClientMessage pull;
  pull.mutable_pull()->set_step(0);
  ASSERT_TRUE(session.Write(Part(push, 0, 2, true), 12));
  ASSERT_TRUE(session.Write(pull, 13));
  ASSERT_TRUE(session.Read(&reply));
  EXPECT_EQ(reply.request_id(), 13u);
  EXPECT_NE(reply.message().find("in the middle of a push sent in parts"), std::string::npos)
      << reply.message();

  EXPECT_DOUBLE_EQ(Stats().param_sum(), before);
  EXPECT_EQ(Stats().pushes_applied(), 0);
  EXPECT_EQ(Stats().requests_rejected(), 3);
  // The stream goes on: a whole push after all that applies once.
  ASSERT_TRUE(session.Write(push, 14));
  ASSERT_TRUE(session.Read(&reply));
  EXPECT_EQ(reply.request_id(), 14u);
  EXPECT_EQ(reply.code(), 0) << reply.message();
  EXPECT_TRUE(reply.push().applied());
  EXPECT_NEAR((before - Stats().param_sum()) / 260.0, 1.0, 1e-4);
}

TEST_F(ServerProcessTest, BadRequestsAreRejectedAndChangeNothing) {
  const double before = Stats().param_sum();
  Session session(stub_.get(), JobHash(job_), 1);
  ASSERT_TRUE(session.hello_ok());

  ClientMessage wrong_size = Push(0, 1.0f);
  wrong_size.mutable_push()->mutable_blocks(0)->mutable_data()->append("xyzw");
  ClientMessage unknown_block = Push(0, 1.0f);
  unknown_block.mutable_push()->mutable_blocks(0)->set_block_id(12345);
  ClientMessage nan_gradient = Push(0, 1.0f);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(nan_gradient.mutable_push()->mutable_blocks(0)->mutable_data()->data(), &nan, 4);
  ClientMessage inf_gradient = Push(0, 1.0f);
  const float inf = std::numeric_limits<float>::infinity();
  std::memcpy(inf_gradient.mutable_push()->mutable_blocks(1)->mutable_data()->data() + 8, &inf,
              4);
  ClientMessage push_and_pull = Push(0, 1.0f);
  push_and_pull.mutable_pull()->set_step(0);
  ClientMessage empty;

  struct Case {
    const char* name;
    const ClientMessage* message;
    absl::StatusCode code;
    const char* says;
  };
  const Case cases[] = {
      {"wrong size", &wrong_size, absl::StatusCode::kInvalidArgument, "bytes, expected"},
      {"unknown block", &unknown_block, absl::StatusCode::kNotFound, "block 12345"},
      {"NaN gradient", &nan_gradient, absl::StatusCode::kInvalidArgument, "NaN"},
      {"Inf gradient", &inf_gradient, absl::StatusCode::kInvalidArgument, "infinite"},
      {"push and pull in one message", &push_and_pull, absl::StatusCode::kInvalidArgument,
       "more than one of hello, push and pull"},
      {"empty message", &empty, absl::StatusCode::kInvalidArgument, "expected a push or a pull"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    ServerMessage reply;
    ASSERT_TRUE(session.Send(*c.message, &reply));
    EXPECT_EQ(reply.code(), static_cast<int>(c.code));
    EXPECT_NE(reply.message().find(c.says), std::string::npos) << reply.message();
    EXPECT_DOUBLE_EQ(Stats().param_sum(), before);
  }
  tessera::v1::ShardStatsResponse stats = Stats();
  EXPECT_EQ(stats.requests_rejected(), 6);
  EXPECT_EQ(stats.nonfinite_rejected(), 2);
  EXPECT_EQ(stats.pushes_applied(), 0);
  // The stream survives bad requests and the next good push applies.
  ServerMessage reply;
  ASSERT_TRUE(session.Send(Push(0, 1.0f), &reply));
  EXPECT_EQ(reply.code(), 0) << reply.message();
  EXPECT_TRUE(reply.push().applied());
  EXPECT_NEAR((before - Stats().param_sum()) / 260.0, 1.0, 1e-4);
}

// The same-host path: payloads through the worker's shared-memory region
// give the same results as payloads on the stream, and bad references to
// the region are refused like any bad block.
TEST_F(ServerProcessTest, SharedMemoryPayloadsMatchTheStreamAndBadRangesAreRefused) {
  if (!SharedRegion::Create(4096, 4096).ok()) GTEST_SKIP() << "no usable /dev/shm here";
  const uint64_t bytes =
      SharedAreaBytes(partition_->shard_bytes(0), partition_->shard_blocks(0).size());
  absl::StatusOr<std::unique_ptr<SharedRegion>> region = SharedRegion::Create(bytes, bytes);
  ASSERT_TRUE(region.ok()) << region.status();
  const double before = Stats().param_sum();

  Session shm(stub_.get(), JobHash(job_), 1, region->get());
  ASSERT_TRUE(shm.hello_ok());
  ASSERT_TRUE(shm.hello_reply().shm_accepted()) << shm.hello_reply().shm_detail();
  (*region)->Unlink();

  // A push whose payloads sit in the region applies exactly once.
  ClientMessage push = Push(0, 1.0f);
  std::vector<std::string> parked;
  OffloadBlocks(push.mutable_push()->mutable_blocks(), (*region)->request_area(), &parked);
  ASSERT_GT(push.push().blocks(0).shm_size(), 0u);
  ServerMessage reply;
  ASSERT_TRUE(shm.Send(push, &reply));
  ASSERT_EQ(reply.code(), 0) << reply.message();
  EXPECT_TRUE(reply.push().applied());
  EXPECT_NEAR((before - Stats().param_sum()) / 260.0, 1.0, 1e-4);

  // A pull answers through the region with the bytes a plain stream gets.
  ClientMessage pull;
  pull.mutable_pull()->set_step(0);
  ServerMessage via_shm, via_stream;
  ASSERT_TRUE(shm.Send(pull, &via_shm));
  ASSERT_EQ(via_shm.code(), 0) << via_shm.message();
  Session plain(stub_.get(), JobHash(job_), 2);
  ASSERT_TRUE(plain.hello_ok());
  EXPECT_FALSE(plain.hello_reply().shm_accepted());
  ASSERT_TRUE(plain.Send(pull, &via_stream));
  ASSERT_EQ(via_shm.pull().blocks_size(), via_stream.pull().blocks_size());
  for (int i = 0; i < via_shm.pull().blocks_size(); ++i) {
    const tessera::v1::TensorBlock& b = via_shm.pull().blocks(i);
    EXPECT_GT(b.shm_size(), 0u);
    EXPECT_TRUE(b.data().empty());
    absl::StatusOr<absl::string_view> payload = BlockPayload(b, (*region)->reply_area());
    ASSERT_TRUE(payload.ok()) << payload.status();
    EXPECT_EQ(*payload, via_stream.pull().blocks(i).data()) << "block " << i;
  }

  // A range outside the region changes nothing and is counted.
  const double applied_sum = Stats().param_sum();
  const int64_t rejected = Stats().requests_rejected();
  ClientMessage outside = Push(1, 1.0f);
  OffloadBlocks(outside.mutable_push()->mutable_blocks(), (*region)->request_area(), &parked);
  outside.mutable_push()->mutable_blocks(0)->set_shm_offset((*region)->request_area().size());
  ASSERT_TRUE(shm.Send(outside, &reply));
  EXPECT_EQ(reply.code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  EXPECT_NE(reply.message().find("leaves the"), std::string::npos) << reply.message();
  EXPECT_DOUBLE_EQ(Stats().param_sum(), applied_sum);
  EXPECT_EQ(Stats().requests_rejected(), rejected + 1);

  // A Hello whose nonce does not match the region is declined (payloads
  // stay on the stream), and a region reference on that stream is refused.
  absl::StatusOr<std::unique_ptr<SharedRegion>> other = SharedRegion::Create(bytes, bytes);
  ASSERT_TRUE(other.ok()) << other.status();
  const std::string wrong(16, 'x');
  Session forged(stub_.get(), JobHash(job_), 3, other->get(), &wrong);
  ASSERT_TRUE(forged.hello_ok());
  EXPECT_FALSE(forged.hello_reply().shm_accepted());
  EXPECT_NE(forged.hello_reply().shm_detail().find("header does not match"), std::string::npos)
      << forged.hello_reply().shm_detail();
  ClientMessage reference = Push(1, 1.0f);
  OffloadBlocks(reference.mutable_push()->mutable_blocks(), (*other)->request_area(), &parked);
  ASSERT_TRUE(forged.Send(reference, &reply));
  EXPECT_EQ(reply.code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  EXPECT_NE(reply.message().find("this stream has none"), std::string::npos) << reply.message();
  EXPECT_DOUBLE_EQ(Stats().param_sum(), applied_sum);
}

TEST_F(ServerProcessTest, WrongJobHashIsRefused) {
  const double before = Stats().param_sum();
  Session session(stub_.get(), JobHash(job_) ^ 1, 1);
  grpc::Status s = session.Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(s.error_message().find("different job"), std::string::npos) << s.error_message();
  EXPECT_DOUBLE_EQ(Stats().param_sum(), before);
}

TEST_F(ServerProcessTest, HelloOfAnotherProtocolVersionIsRefused) {
  const double before = Stats().param_sum();
  {
    Session current(stub_.get(), JobHash(job_), 1);
    ASSERT_TRUE(current.hello_ok());
    EXPECT_EQ(current.hello_reply().protocol_version(), kSessionProtocolVersion);
  }
  // 0: a worker from before versions were sent.
  for (uint32_t version : {0u, kSessionProtocolVersion + 1}) {
    Session session(stub_.get(), JobHash(job_), 1, nullptr, nullptr, 0, version);
    grpc::Status s = session.Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << version;
    EXPECT_NE(s.error_message().find(absl::StrCat("worker 0 speaks session protocol ", version,
                                                  " but shard 0 speaks ", kSessionProtocolVersion)),
              std::string::npos)
        << s.error_message();
  }
  EXPECT_DOUBLE_EQ(Stats().param_sum(), before);
}

// A server of a release before protocol versions: answers a Hello without
// one, then reads whatever follows.
class UnversionedService final : public tessera::v1::ParameterService::Service {
 public:
  grpc::Status Session(grpc::ServerContext* context,
                       grpc::ServerReaderWriter<ServerMessage, ClientMessage>* stream) override {
    ClientMessage request;
    if (!stream->Read(&request)) return grpc::Status::OK;
    ServerMessage reply;
    reply.set_request_id(request.request_id());
    if (!stream->Write(reply)) return grpc::Status::OK;
    while (stream->Read(&request)) {
    }
    return grpc::Status::OK;
  }
};

TEST_F(ServerProcessTest, WorkerRefusesAServerOfAnotherProtocolVersion) {
  UnversionedService service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> old_server = builder.BuildAndStart();
  ASSERT_NE(old_server, nullptr);
  ASSERT_GT(port, 0);
  GrpcClientOptions options;
  options.servers = {absl::StrCat("127.0.0.1:", port)};
  options.worker_id = 0;
  options.incarnation = 1;
  options.job_hash = JobHash(job_);
  options.connect_timeout = absl::Seconds(10);
  options.shared_memory = false;
  auto client = CreateGrpcParameterClient(*partition_, options);
  ASSERT_FALSE(client.ok());
  EXPECT_EQ(client.status().code(), absl::StatusCode::kFailedPrecondition) << client.status();
  EXPECT_TRUE(absl::StrContains(
      client.status().message(),
      absl::StrCat("speaks session protocol 0 but this worker speaks ", kSessionProtocolVersion)))
      << client.status();
  old_server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
}

TEST_F(ServerProcessTest, OversizedMessageIsResourceExhausted) {
  const double before = Stats().param_sum();
  Session session(stub_.get(), JobHash(job_), 1);
  ASSERT_TRUE(session.hello_ok());
  ClientMessage huge = Push(0, 1.0f);
  huge.mutable_push()->mutable_blocks(0)->mutable_data()->resize(6 << 20);
  ServerMessage reply;
  EXPECT_FALSE(session.Send(huge, &reply));
  EXPECT_EQ(session.Finish().error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_DOUBLE_EQ(Stats().param_sum(), before);
}

TEST_F(ServerProcessTest, SessionsBeyondTheLimitAreShed) {
  // The job has one worker: the default limit is 4 * 1 + 8 = 12 sessions.
  std::vector<std::unique_ptr<Session>> open;
  for (int i = 0; i < 12; ++i) {
    open.push_back(std::make_unique<Session>(stub_.get(), JobHash(job_), 1));
    ASSERT_TRUE(open.back()->hello_ok()) << "session " << i;
  }
  Session extra(stub_.get(), JobHash(job_), 1);
  EXPECT_FALSE(extra.hello_ok());
  grpc::Status shed = extra.Finish();
  EXPECT_EQ(shed.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(shed.error_message().find("12 sessions"), std::string::npos) << shed.error_message();
  // Closing one makes room again.
  open.pop_back();
  absl::SleepFor(absl::Milliseconds(100));
  Session again(stub_.get(), JobHash(job_), 1);
  EXPECT_TRUE(again.hello_ok());
}

TEST_F(ServerProcessTest, SecondServerOnTheSamePortFailsLoudly) {
  const absl::Time start = absl::Now();
  RunResult r = RunProgram({Bin("tessera-server"), "--job=" + job_path_, "--shard=0",
                     absl::StrCat("--listen=127.0.0.1:", server_->port())},
                    dir_, absl::Seconds(10));
  EXPECT_NE(r.status, 0);
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));  // no retrying, no waiting
  EXPECT_NE(r.output.find("cannot listen on 127.0.0.1:" + std::to_string(server_->port())),
            std::string::npos)
      << r.output;
  // The first server is unharmed.
  EXPECT_EQ(Stats().shard(), 0);
}

TEST(WorkerFlagsTest, NegativeTimeoutsNameTheFlag) {
  const std::string dir = NewTempDir("badflag");
  const std::string path = dir + "/job.textproto";
  WriteFile(path, kExactSumJob);
  for (const char* flag : {"--connect_timeout_s", "--retry_timeout_s", "--request_timeout_s"}) {
    SCOPED_TRACE(flag);
    RunResult r = RunProgram({Bin("tessera-worker"), "--job=" + path, "--servers=127.0.0.1:1",
                              std::string(flag) + "=-3"},
                             dir, absl::Seconds(10));
    EXPECT_EQ(r.status, 1) << r.output;
    EXPECT_NE(r.output.find(std::string(flag) + " must not be negative, got -3"),
              std::string::npos)
        << r.output;
  }
}

TEST(JobFileTest, MalformedJobFilesNameTheProblem) {
  const std::string dir = NewTempDir("badjob");
  struct Case {
    const char* name;
    std::string text;
    const char* says;
  };
  const std::string base = kExactSumJob;
  std::string bad_model = base;
  bad_model.replace(bad_model.find("linear:64-4"), 11, "mlp:64-x-4");
  std::string bad_enum = base;
  bad_enum.replace(bad_enum.find("MEAN_SQUARED_ERROR"), 18, "HINGE");
  std::string zero_batch = base;
  zero_batch.replace(zero_batch.find("batch_size: 4"), 13, "batch_size: 0");
  const Case cases[] = {
      {"misspelled_field", base + "epoch: 3\n", "epoch"},
      {"zero_batch", zero_batch, "job.batch_size"},
      {"bad_model", bad_model, "job.model"},
      {"bad_enum", bad_enum, "HINGE"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string path = dir + "/" + c.name + ".textproto";
    WriteFile(path, c.text);
    for (const char* binary : {"tessera-server", "tessera-worker"}) {
      const absl::Time start = absl::Now();
      std::vector<std::string> argv = {Bin(binary), "--job=" + path};
      if (std::string(binary) == "tessera-worker") argv.push_back("--servers=127.0.0.1:1");
      RunResult r = RunProgram(argv, dir, absl::Seconds(10));
      EXPECT_EQ(r.status, 1) << binary << ": " << r.output;
      // Fails fast: RELIABILITY.md asks for 1 s on an idle machine; 5 s leaves
      // room for a loaded CI machine and still rules out any network wait.
      EXPECT_LT(absl::Now() - start, absl::Seconds(5)) << binary;
      EXPECT_NE(r.output.find(c.says), std::string::npos) << binary << ": " << r.output;
      EXPECT_NE(r.output.find(path), std::string::npos) << binary << ": " << r.output;
      EXPECT_EQ(r.output.find("core dumped"), std::string::npos);
    }
  }
  RunResult missing = RunProgram({Bin("tessera-server"), "--job=" + dir + "/nope.textproto"}, dir,
                          absl::Seconds(10));
  EXPECT_EQ(missing.status, 1);
  EXPECT_NE(missing.output.find("nope.textproto"), std::string::npos) << missing.output;
}

TEST(CommandLineTest, HelpExitsZeroAndListsFlags) {
  const std::string dir = NewTempDir("help");
  const std::pair<const char*, const char*> binaries[] = {
      {"tessera-server", "--shard"}, {"tessera-worker", "--rank"}, {"tessera", "--workers"}};
  for (const auto& [binary, flag] : binaries) {
    RunResult r = RunProgram({Bin(binary), "--help"}, dir, absl::Seconds(10));
    EXPECT_EQ(r.status, 0) << binary;
    // One header naming the program, not Abseil's placeholder.
    EXPECT_TRUE(absl::StartsWith(r.output, absl::StrCat(binary, ": "))) << r.output;
    EXPECT_FALSE(absl::StrContains(r.output, absl::StrCat(binary, ": ", binary, ":"))) << r.output;
    EXPECT_FALSE(absl::StrContains(r.output, "UNKNOWN")) << r.output;
    EXPECT_NE(r.output.find(std::string(flag).substr(2)), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("learning_rate"), std::string::npos) << r.output;
  }
  RunResult unknown = RunProgram({Bin("tessera-server"), "--no_such_flag=1"}, dir, absl::Seconds(10));
  EXPECT_NE(unknown.status, 0);
  EXPECT_NE(unknown.output.find("no_such_flag"), std::string::npos) << unknown.output;
}

// The worker writes dense gradients straight into its shared-memory region.
// When the server dies with a push in flight and a new one takes its place,
// the resend goes through a new region and must carry the same bytes: the
// new server's exact-sum parameters move by exactly the pushes it applied.
TEST_F(ServerProcessTest, SharedMemoryPushIsResentWhole) {
  if (!SharedRegion::Create(4096, 4096).ok()) GTEST_SKIP() << "no usable /dev/shm here";
  GrpcClientOptions options;
  options.servers = {server_->address()};
  options.worker_id = 0;
  options.incarnation = 1;
  options.job_hash = JobHash(job_);
  options.request_timeout = absl::Seconds(1);
  options.connect_timeout = absl::Seconds(10);
  ::testing::internal::CaptureStderr();
  auto client = CreateGrpcParameterClient(*partition_, options);
  ASSERT_TRUE(client.ok()) << client.status();
  const double before = Stats().param_sum();
  std::vector<float> grads(partition_->total_elements(), 1.0f);
  std::vector<float> params(partition_->total_elements());
  ASSERT_TRUE((*client)->PushAndPull(0, grads, absl::MakeSpan(params)).ok());

  // Kill the server, push step 1 (written into the old region, then
  // retried), and start a fresh server on the same port: only the resend
  // can reach it.
  const int port = server_->port();
  server_->process()->Signal(SIGKILL);
  ASSERT_TRUE(server_->process()->Wait(absl::Seconds(10)).has_value());
  absl::StatusOr<ParameterClient::PushPullResult> second;
  std::thread pusher([&] { second = (*client)->PushAndPull(1, grads, absl::MakeSpan(params)); });
  absl::SleepFor(absl::Milliseconds(500));
  server_ = ServerProcess::Start(
      dir_, {"--job=" + job_path_, "--shard=0", absl::StrCat("--listen=127.0.0.1:", port)});
  ASSERT_NE(server_, nullptr);
  pusher.join();
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_TRUE((*client)->PushAndPull(2, grads, absl::MakeSpan(params)).ok());
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(log.find("payloads through shared memory"), std::string::npos) << log;
  EXPECT_NE(log.find("reconnected"), std::string::npos) << log;

  // The new server started from the same initial parameters (the job's
  // seed) and applied steps 1 and 2; a resend of the bytes the new region
  // happened to hold (zeros) would have moved them by one push only.
  const tessera::v1::ShardStatsResponse after = Stats();
  EXPECT_EQ(after.pushes_applied(), 2);
  EXPECT_EQ(after.requests_rejected(), 0);
  // 260 parameters, each lowered by exactly 1 per applied push.
  EXPECT_NEAR((before - after.param_sum()) / 260.0, 2.0, 1e-4);
  // The parameters the worker received last are the server's.
  double received = 0;
  for (float p : params) received += p;
  EXPECT_NEAR(received, after.param_sum(), 1e-3);
}

// The split push (StartPushAndPull, MarkParamReady, FinishPushAndPull)
// against two real servers: nothing leaves before its parameters are
// ready, a shard whose parameters are all ready leaves while the other
// still waits, the exact-sum counts come out right, and an aborted
// exchange sends nothing that was still waiting.
TEST(SplitPushTest, EachShardLeavesWhenItsParametersAreReady) {
  const std::string dir = NewTempDir("split");
  std::string text = kExactSumJob;
  text.replace(text.find("num_shards: 1"), 13, "num_shards: 2");
  const std::string job_path = dir + "/job.textproto";
  WriteFile(job_path, text);
  auto job = LoadJob(job_path, {});
  ASSERT_TRUE(job.ok()) << job.status();
  auto model = ParseModelSpec(job->model(), LossKind::kMeanSquaredError);
  ASSERT_TRUE(model.ok());
  auto partition = Partition::Create(*model, 2, job->block_bytes());
  ASSERT_TRUE(partition.ok());
  // linear:64-4 in 256-byte blocks: shard 1 holds only weight blocks
  // (parameter 0); shard 0 holds weight blocks and the bias (parameter 1).
  int64_t shard_elements[2] = {0, 0};
  bool shard1_weight_only = true, shard0_has_bias = false;
  for (const BlockInfo& b : partition->blocks()) {
    shard_elements[b.shard] += b.num_elements;
    if (b.shard == 1 && b.param_index != 0) shard1_weight_only = false;
    if (b.shard == 0 && b.param_index == 1) shard0_has_bias = true;
  }
  ASSERT_TRUE(shard1_weight_only && shard0_has_bias) << "the partition changed; adapt the test";

  std::unique_ptr<ServerProcess> servers[2];
  std::unique_ptr<tessera::v1::ParameterService::Stub> stubs[2];
  for (int s = 0; s < 2; ++s) {
    servers[s] = ServerProcess::Start(dir, {"--job=" + job_path, absl::StrCat("--shard=", s)});
    ASSERT_NE(servers[s], nullptr);
    stubs[s] = tessera::v1::ParameterService::NewStub(
        grpc::CreateChannel(servers[s]->address(), grpc::InsecureChannelCredentials()));
  }
  auto stats = [&](int s) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    tessera::v1::ShardStatsResponse out;
    grpc::Status st = stubs[s]->ShardStats(&ctx, {}, &out);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return out;
  };
  auto wait_applied = [&](int s, int64_t n) {
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    while (stats(s).pushes_applied() < n && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(20));
    }
    return stats(s).pushes_applied();
  };
  const double before[2] = {stats(0).param_sum(), stats(1).param_sum()};

  GrpcClientOptions options;
  options.servers = {servers[0]->address(), servers[1]->address()};
  options.job_hash = JobHash(*job);
  options.incarnation = 1;
  auto client = CreateGrpcParameterClient(*partition, options);
  ASSERT_TRUE(client.ok()) << client.status();
  std::vector<float> grads(partition->total_elements(), 1.0f);
  std::vector<float> params(partition->total_elements());

  ASSERT_TRUE((*client)->StartPushAndPull(0, grads, absl::MakeSpan(params)).ok());
  EXPECT_EQ((*client)->StartPushAndPull(0, grads, absl::MakeSpan(params)).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*client)->Pull(0, absl::MakeSpan(params)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_EQ(stats(0).pushes_applied(), 0);
  EXPECT_EQ(stats(1).pushes_applied(), 0);
  (*client)->MarkParamReady(0);  // the weight: all of shard 1, part of shard 0
  EXPECT_EQ(wait_applied(1, 1), 1);
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_EQ(stats(0).pushes_applied(), 0);  // still waits for the bias
  absl::StatusOr<ParameterClient::PushPullResult> done = (*client)->FinishPushAndPull();
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->not_applied, 0);
  for (int s = 0; s < 2; ++s) {
    const tessera::v1::ShardStatsResponse after = stats(s);
    EXPECT_EQ(after.pushes_applied(), 1) << "shard " << s;
    // Exact sum: every parameter of the shard lowered by exactly 1.
    EXPECT_NEAR(before[s] - after.param_sum(), static_cast<double>(shard_elements[s]), 1e-3)
        << "shard " << s;
  }
  double received = 0;
  for (float p : params) received += p;
  EXPECT_NEAR(received, stats(0).param_sum() + stats(1).param_sum(), 1e-3);

  // Aborted before anything was ready: nothing is sent, and the client
  // goes on working.
  ASSERT_TRUE((*client)->StartPushAndPull(1, grads, absl::MakeSpan(params)).ok());
  (*client)->AbortPushAndPull();
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_EQ(stats(0).pushes_applied(), 1);
  EXPECT_EQ(stats(1).pushes_applied(), 1);
  ASSERT_TRUE((*client)->PushAndPull(1, grads, absl::MakeSpan(params)).ok());
  EXPECT_EQ(stats(0).pushes_applied(), 2);
  EXPECT_EQ(stats(1).pushes_applied(), 2);
  EXPECT_EQ(stats(0).requests_rejected() + stats(1).requests_rejected(), 0);
}

// A worker that computes for longer than the keepalive timeout (15 s: 10 s
// ping, 5 s to answer) between two calls keeps its stream: the client must
// read the server's ping replies while no call is in flight. Takes 17 s.
TEST_F(ServerProcessTest, IdleClientKeepsItsStreamPastTheKeepaliveTimeout) {
  GrpcClientOptions options;
  options.servers = {server_->address()};
  options.worker_id = 0;
  options.incarnation = 1;
  options.job_hash = JobHash(job_);
  auto client = CreateGrpcParameterClient(*partition_, options);
  ASSERT_TRUE(client.ok()) << client.status();
  std::vector<float> params(partition_->total_elements());
  ASSERT_TRUE((*client)->Pull(0, absl::MakeSpan(params)).ok());
  ::testing::internal::CaptureStderr();
  absl::SleepFor(absl::Seconds(17));  // "computing"
  const absl::StatusOr<int64_t> pulled = (*client)->Pull(0, absl::MakeSpan(params));
  const std::string log = ::testing::internal::GetCapturedStderr();
  ASSERT_TRUE(pulled.ok()) << pulled.status();
  EXPECT_EQ(log.find("retrying"), std::string::npos) << log;
}

}  // namespace
}  // namespace tessera
