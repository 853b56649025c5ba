#include "common/socket_tuning.h"

#include <chrono>
#include <memory>
#include <string>
#include <thread>

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

// The hook runs on all three kinds of socket of a real connection on
// 127.0.0.1 and the kernel reports the floor back (rounded up to its tick).
TEST(SocketTuningTest, FloorLandsOnListenerAndBothEndsOfAConnection) {
  if (!KernelHasRtoMin()) GTEST_SKIP() << "kernel has no TCP_RTO_MIN_US (Linux < 6.15)";
  const SocketTuning tuning = Floor(20000);
  const SocketTuningCounts before = GetSocketTuningCounts();

  // Any synchronous service will do: only connections matter here.
  tessera::v1::CoordinatorService::Service service;
  grpc::ServerBuilder builder;
  builder.RegisterService(&service);
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  ApplySocketTuning(tuning, &builder);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  ASSERT_GT(port, 0);

  grpc::ChannelArguments args;
  ApplySocketTuning(tuning, &args);
  auto channel = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port),
                                           grpc::InsecureChannelCredentials(), args);
  ASSERT_TRUE(channel->WaitForConnected(std::chrono::system_clock::now() +
                                        std::chrono::seconds(10)));
  // The server side accepts on its own thread.
  SocketTuningCounts after = GetSocketTuningCounts();
  for (int i = 0; i < 200 && after.server_connections == before.server_connections; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    after = GetSocketTuningCounts();
  }
  EXPECT_GE(after.server_listeners, before.server_listeners + 1);
  EXPECT_GE(after.client_connections, before.client_connections + 1);
  EXPECT_GE(after.server_connections, before.server_connections + 1);
  EXPECT_EQ(after.refused, before.refused);
  // 20 ms is a whole number of ticks at HZ 100, 250 and 1000.
  EXPECT_EQ(after.last_read_back_us, 20000);

  // Without a floor the client's socket is not touched (the channel
  // arguments differ, so it gets a connection of its own).
  grpc::ChannelArguments plain;
  ApplySocketTuning(SocketTuning(), &plain);
  auto untuned = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port),
                                           grpc::InsecureChannelCredentials(), plain);
  const SocketTuningCounts mid = GetSocketTuningCounts();
  ASSERT_TRUE(untuned->WaitForConnected(std::chrono::system_clock::now() +
                                        std::chrono::seconds(10)));
  EXPECT_EQ(GetSocketTuningCounts().client_connections, mid.client_connections);
  server->Shutdown();
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

// The algorithm lands on the listener and both ends of a real connection,
// with or without a floor. Reno rather than BBR: it is in every kernel
// and not the usual default (cubic), so the read-back shows the change.
TEST(SocketTuningTest, CongestionControlLandsOnBothEndsOfAConnection) {
  if (!CheckSocketTuning(Congestion("reno")).ok()) GTEST_SKIP() << "reno not allowed here";
  const SocketTuning tuning = Congestion("reno");
  const SocketTuningCounts before = GetSocketTuningCounts();

  tessera::v1::CoordinatorService::Service service;
  grpc::ServerBuilder builder;
  builder.RegisterService(&service);
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  ApplySocketTuning(tuning, &builder);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  ASSERT_GT(port, 0);

  grpc::ChannelArguments args;
  ApplySocketTuning(tuning, &args);
  auto channel = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port),
                                           grpc::InsecureChannelCredentials(), args);
  ASSERT_TRUE(channel->WaitForConnected(std::chrono::system_clock::now() +
                                        std::chrono::seconds(10)));
  SocketTuningCounts after = GetSocketTuningCounts();
  for (int i = 0; i < 200 && after.server_connections == before.server_connections; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    after = GetSocketTuningCounts();
  }
  EXPECT_GE(after.server_listeners, before.server_listeners + 1);
  EXPECT_GE(after.client_connections, before.client_connections + 1);
  EXPECT_GE(after.server_connections, before.server_connections + 1);
  EXPECT_EQ(after.refused, before.refused);
  EXPECT_EQ(after.last_congestion, "reno");
  server->Shutdown();
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
  // The counts are per process: pick an algorithm other than the one the
  // last tuned socket reported, so the read-back shows this server's.
  const SocketTuningCounts before = GetSocketTuningCounts();
  std::string algorithm;
  for (const char* name : {"reno", "cubic", "bbr"}) {
    if (name != before.last_congestion && CheckSocketTuning(Congestion(name)).ok()) {
      algorithm = name;
      break;
    }
  }
  if (algorithm.empty()) GTEST_SKIP() << "no second algorithm allowed here";
  SocketTuning tuning;
  tuning.loopback_congestion = algorithm;

  tessera::v1::CoordinatorService::Service service;
  grpc::ServerBuilder builder;
  builder.RegisterService(&service);
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  ApplySocketTuning(tuning, &builder);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);

  grpc::ChannelArguments plain;
  plain.SetInt("tessera.test.unique", 3);  // a connection of its own
  auto channel = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port),
                                           grpc::InsecureChannelCredentials(), plain);
  ASSERT_TRUE(channel->WaitForConnected(std::chrono::system_clock::now() +
                                        std::chrono::seconds(10)));
  SocketTuningCounts after = GetSocketTuningCounts();
  for (int i = 0; i < 200 && after.server_connections == before.server_connections; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    after = GetSocketTuningCounts();
  }
  EXPECT_GE(after.server_connections, before.server_connections + 1);
  EXPECT_EQ(after.client_connections, before.client_connections);
  EXPECT_EQ(after.refused, before.refused);
  EXPECT_EQ(after.last_congestion, algorithm);
  server->Shutdown();
}

}  // namespace
}  // namespace tessera
