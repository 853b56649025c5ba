#include "common/socket_tuning.h"

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/tessera.grpc.pb.h"

namespace tessera {
namespace {

using ::testing::HasSubstr;

SocketTuning Floor(int us) {
  SocketTuning t;
  t.tcp_rto_min_us = us;
  return t;
}

SocketTuning Congestion(const std::string& name) {
  SocketTuning t;
  t.tcp_congestion = name;
  return t;
}

// Whether this kernel takes a per-socket floor at all (Linux 6.15+).
bool KernelHasRtoMin() {
  return !absl::IsUnimplemented(CheckSocketTuning(Floor(kDefaultTcpRtoMinUs)));
}

TEST(SocketTuningTest, RefusesOutOfRangeValuesNamingTheFlag) {
  for (int us : {-1, 200001, 1 << 30}) {
    const absl::Status s = CheckSocketTuning(Floor(us));
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << us << ": " << s;
    EXPECT_THAT(s.message(), HasSubstr("--tcp_rto_min_us")) << us;
  }
  EXPECT_TRUE(CheckSocketTuning(Floor(0)).ok());
}

TEST(SocketTuningTest, KernelRefusalIsReportedNotIgnored) {
  if (!KernelHasRtoMin()) GTEST_SKIP() << "kernel has no TCP_RTO_MIN_US (Linux < 6.15)";
  // One microsecond rounds to zero clock ticks, which Linux refuses.
  const absl::Status s = CheckSocketTuning(Floor(1));
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_THAT(s.message(), HasSubstr("refuses 1 microseconds"));
  EXPECT_TRUE(CheckSocketTuning(Floor(kDefaultTcpRtoMinUs)).ok());
  EXPECT_TRUE(CheckSocketTuning(Floor(200000)).ok());
}

// A server on 127.0.0.1 whose sockets get `tuning`, to watch the hook on
// real connections. Any synchronous service will do: only connections
// matter here.
class TunedServer {
 public:
  explicit TunedServer(const SocketTuning& tuning) {
    grpc::ServerBuilder builder;
    builder.RegisterService(&service_);
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    ApplySocketTuning(tuning, &builder);
    server_ = builder.BuildAndStart();
  }
  ~TunedServer() {
    if (server_ != nullptr) server_->Shutdown();
  }
  bool ok() const { return server_ != nullptr && port_ > 0; }

  // Connects a channel whose sockets get `client` (`unique` keeps gRPC
  // from sharing another channel's connection) and, with
  // `wait_for_server`, waits until the server has accepted and tuned its
  // end (it accepts on its own thread). The channel stays open.
  bool Connect(const SocketTuning& client, int unique, bool wait_for_server) {
    const SocketTuningCounts before = GetSocketTuningCounts();
    grpc::ChannelArguments args;
    args.SetInt("tessera.test.unique", unique);
    ApplySocketTuning(client, &args);
    channels_.push_back(grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port_),
                                                  grpc::InsecureChannelCredentials(), args));
    if (!channels_.back()->WaitForConnected(std::chrono::system_clock::now() +
                                            std::chrono::seconds(10))) {
      return false;
    }
    for (int i = 0; wait_for_server && i < 200 &&
                    GetSocketTuningCounts().server_connections == before.server_connections;
         ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return true;
  }

 private:
  tessera::v1::CoordinatorService::Service service_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
  std::vector<std::shared_ptr<grpc::Channel>> channels_;
};

// The listener and both ends of a connection were tuned since `before`
// (at least one more socket of each kind) and no socket refused an option.
void ExpectEveryKindTuned(const SocketTuningCounts& before, const SocketTuningCounts& after) {
  EXPECT_GE(after.server_listeners, before.server_listeners + 1);
  EXPECT_GE(after.client_connections, before.client_connections + 1);
  EXPECT_GE(after.server_connections, before.server_connections + 1);
  EXPECT_EQ(after.refused, before.refused);
}

// An algorithm this process may use other than `not_this`, or "". The
// counts are per process, so a test that reads last_congestion back picks
// one that no earlier socket reported.
std::string OtherAllowedAlgorithm(const std::string& not_this) {
  for (const char* name : {"reno", "cubic", "bbr"}) {
    if (name != not_this && CheckSocketTuning(Congestion(name)).ok()) return name;
  }
  return "";
}

// The hook runs on all three kinds of socket of a real connection on
// 127.0.0.1 and the kernel reports the floor back (rounded up to its tick).
TEST(SocketTuningTest, FloorLandsOnListenerAndBothEndsOfAConnection) {
  if (!KernelHasRtoMin()) GTEST_SKIP() << "kernel has no TCP_RTO_MIN_US (Linux < 6.15)";
  const SocketTuning tuning = Floor(20000);
  const SocketTuningCounts before = GetSocketTuningCounts();
  TunedServer server(tuning);
  ASSERT_TRUE(server.ok());
  ASSERT_TRUE(server.Connect(tuning, 1, /*wait_for_server=*/true));
  const SocketTuningCounts after = GetSocketTuningCounts();
  ExpectEveryKindTuned(before, after);
  // 20 ms is a whole number of ticks at HZ 100, 250 and 1000.
  EXPECT_EQ(after.last_read_back_us, 20000);

  // Without a floor the client's socket is not touched.
  const SocketTuningCounts mid = GetSocketTuningCounts();
  ASSERT_TRUE(server.Connect(SocketTuning(), 2, /*wait_for_server=*/false));
  EXPECT_EQ(GetSocketTuningCounts().client_connections, mid.client_connections);
}

TEST(SocketTuningTest, UnknownCongestionControlIsRefusedNamingTheFlag) {
  for (const std::string name : {"no-such-cc", "a-name-far-too-long-for-linux"}) {
    const absl::Status s = CheckSocketTuning(Congestion(name));
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << name << ": " << s;
    EXPECT_THAT(s.message(), HasSubstr("--tcp_congestion")) << name;
    EXPECT_THAT(s.message(), HasSubstr(name)) << name;
  }
  // Reno is built into every Linux kernel.
  EXPECT_TRUE(CheckSocketTuning(Congestion("reno")).ok());
  // The algorithm is checked even when the floor is left alone.
  SocketTuning both = Congestion("no-such-cc");
  both.tcp_rto_min_us = 0;
  EXPECT_TRUE(absl::IsInvalidArgument(CheckSocketTuning(both)));
}

// The algorithm lands on the listener and both ends of a real connection.
TEST(SocketTuningTest, CongestionControlLandsOnBothEndsOfAConnection) {
  const SocketTuningCounts before = GetSocketTuningCounts();
  const std::string algorithm = OtherAllowedAlgorithm(before.last_congestion);
  if (algorithm.empty()) GTEST_SKIP() << "no second algorithm allowed here";
  const SocketTuning tuning = Congestion(algorithm);
  TunedServer server(tuning);
  ASSERT_TRUE(server.ok());
  ASSERT_TRUE(server.Connect(tuning, 3, /*wait_for_server=*/true));
  const SocketTuningCounts after = GetSocketTuningCounts();
  ExpectEveryKindTuned(before, after);
  EXPECT_EQ(after.last_congestion, algorithm);
}

TEST(SocketTuningTest, LoopbackTargetsGetTheLoopbackAlgorithm) {
  SocketTuning tuning;
  tuning.loopback_congestion = "reno";
  for (const char* target : {"127.0.0.1:7070", "localhost:7070", "ipv4:127.0.0.2:1",
                             "dns:///localhost:7070", "[::1]:7070"}) {
    EXPECT_EQ(ForTarget(tuning, target).tcp_congestion, "reno") << target;
  }
  for (const char* target : {"10.0.0.1:7070", "ps-0.tessera:7070", "unix:/tmp/s.sock"}) {
    EXPECT_EQ(ForTarget(tuning, target).tcp_congestion, "") << target;
  }
  // An algorithm asked for applies everywhere.
  tuning.tcp_congestion = "bbr";
  EXPECT_EQ(ForTarget(tuning, "127.0.0.1:7070").tcp_congestion, "bbr");
  EXPECT_EQ(ForTarget(tuning, "10.0.0.1:7070").tcp_congestion, "bbr");
}

// A server picks the loopback algorithm for connections whose peer is a
// loopback address; the client here asks for nothing, so only the
// server's end of the connection changes.
TEST(SocketTuningTest, ServerUsesTheLoopbackAlgorithmForLoopbackPeers) {
  const SocketTuningCounts before = GetSocketTuningCounts();
  const std::string algorithm = OtherAllowedAlgorithm(before.last_congestion);
  if (algorithm.empty()) GTEST_SKIP() << "no second algorithm allowed here";
  SocketTuning tuning;
  tuning.loopback_congestion = algorithm;
  TunedServer server(tuning);
  ASSERT_TRUE(server.ok());
  ASSERT_TRUE(server.Connect(SocketTuning(), 4, /*wait_for_server=*/true));
  const SocketTuningCounts after = GetSocketTuningCounts();
  EXPECT_GE(after.server_connections, before.server_connections + 1);
  EXPECT_EQ(after.client_connections, before.client_connections);
  EXPECT_EQ(after.refused, before.refused);
  EXPECT_EQ(after.last_congestion, algorithm);
}

}  // namespace
}  // namespace tessera
