#include "common/socket_tuning.h"

#include <chrono>
#include <memory>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/tessera.grpc.pb.h"

namespace tessera {
namespace {

using ::testing::HasSubstr;

// Whether this kernel takes a per-socket floor at all (Linux 6.15+).
bool KernelHasRtoMin() {
  return !absl::IsUnimplemented(CheckSocketTuning(SocketTuning{kDefaultTcpRtoMinUs}));
}

TEST(SocketTuningTest, RefusesOutOfRangeValuesNamingTheFlag) {
  for (int us : {-1, 200001, 1 << 30}) {
    const absl::Status s = CheckSocketTuning(SocketTuning{us});
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << us << ": " << s;
    EXPECT_THAT(s.message(), HasSubstr("--tcp_rto_min_us")) << us;
  }
  EXPECT_TRUE(CheckSocketTuning(SocketTuning{0}).ok());
}

TEST(SocketTuningTest, KernelRefusalIsReportedNotIgnored) {
  if (!KernelHasRtoMin()) GTEST_SKIP() << "kernel has no TCP_RTO_MIN_US (Linux < 6.15)";
  // One microsecond rounds to zero clock ticks, which Linux refuses.
  const absl::Status s = CheckSocketTuning(SocketTuning{1});
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_THAT(s.message(), HasSubstr("refuses 1 microseconds"));
  EXPECT_TRUE(CheckSocketTuning(SocketTuning{kDefaultTcpRtoMinUs}).ok());
  EXPECT_TRUE(CheckSocketTuning(SocketTuning{200000}).ok());
}

// The hook runs on all three kinds of socket of a real connection on
// 127.0.0.1 and the kernel reports the floor back (rounded up to its tick).
TEST(SocketTuningTest, FloorLandsOnListenerAndBothEndsOfAConnection) {
  if (!KernelHasRtoMin()) GTEST_SKIP() << "kernel has no TCP_RTO_MIN_US (Linux < 6.15)";
  const SocketTuning tuning{20000};
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
  ApplySocketTuning(SocketTuning{}, &plain);
  auto untuned = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port),
                                           grpc::InsecureChannelCredentials(), plain);
  const SocketTuningCounts mid = GetSocketTuningCounts();
  ASSERT_TRUE(untuned->WaitForConnected(std::chrono::system_clock::now() +
                                        std::chrono::seconds(10)));
  EXPECT_EQ(GetSocketTuningCounts().client_connections, mid.client_connections);
  server->Shutdown();
}

}  // namespace
}  // namespace tessera
