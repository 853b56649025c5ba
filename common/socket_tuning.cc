#include "common/socket_tuning.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <memory>

#include <grpc/support/sync.h>
#include <grpcpp/server_builder.h>
#include <grpcpp/support/channel_arguments.h>

#include "absl/strings/str_cat.h"

// gRPC's public headers name the socket mutator (GRPC_ARG_SOCKET_MUTATOR,
// ChannelArguments::SetSocketMutator) but keep its layout in
// src/core/lib/iomgr/socket_mutator.h. These declarations restate that
// layout as Debian's gRPC 1.51 defines it; socket_tuning_test checks that
// the hook runs and the option lands on both ends of a real connection.
enum grpc_fd_usage {
  GRPC_FD_CLIENT_CONNECTION_USAGE,
  GRPC_FD_SERVER_LISTENER_USAGE,
  GRPC_FD_SERVER_CONNECTION_USAGE,
};
struct grpc_mutate_socket_info {
  int fd;
  grpc_fd_usage usage;
};
struct grpc_socket_mutator_vtable {
  bool (*mutate_fd)(int fd, grpc_socket_mutator* mutator);
  int (*compare)(grpc_socket_mutator* a, grpc_socket_mutator* b);
  void (*destroy)(grpc_socket_mutator* mutator);
  bool (*mutate_fd_2)(const grpc_mutate_socket_info* info, grpc_socket_mutator* mutator);
};
struct grpc_socket_mutator {
  const grpc_socket_mutator_vtable* vtable;
  gpr_refcount refcount;
};
void grpc_socket_mutator_init(grpc_socket_mutator* mutator,
                              const grpc_socket_mutator_vtable* vtable);

namespace tessera {
namespace {

// Linux 6.15 <linux/tcp.h>; bookworm's headers predate it.
#ifndef TCP_RTO_MIN_US
#define TCP_RTO_MIN_US 45
#endif

std::atomic<int64_t> g_tuned[3] = {0, 0, 0};  // by grpc_fd_usage
std::atomic<int64_t> g_refused{0};
std::atomic<int> g_last_read_back_us{0};

// Sets the floor on `fd` and reads it back. errno is left from a failure.
bool SetRtoMin(int fd, int us, int* read_back) {
  if (setsockopt(fd, IPPROTO_TCP, TCP_RTO_MIN_US, &us, sizeof(us)) != 0) return false;
  socklen_t len = sizeof(*read_back);
  return getsockopt(fd, IPPROTO_TCP, TCP_RTO_MIN_US, read_back, &len) == 0;
}

struct TuningMutator : grpc_socket_mutator {
  SocketTuning tuning;

  static bool Mutate(int fd, grpc_fd_usage usage, const SocketTuning& tuning) {
    sockaddr_storage addr;
    socklen_t len = sizeof(addr);
    // Unix-domain sockets have no retransmissions.
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0 ||
        (addr.ss_family != AF_INET && addr.ss_family != AF_INET6)) {
      return true;
    }
    int read_back = 0;
    if (SetRtoMin(fd, tuning.tcp_rto_min_us, &read_back)) {
      g_tuned[usage].fetch_add(1, std::memory_order_relaxed);
      g_last_read_back_us.store(read_back, std::memory_order_relaxed);
    } else {
      g_refused.fetch_add(1, std::memory_order_relaxed);
    }
    // Never fail the connection over a tuning option.
    return true;
  }

  static const grpc_socket_mutator_vtable kVtable;
};

const grpc_socket_mutator_vtable TuningMutator::kVtable = {
    // gRPC calls this one only when mutate_fd_2 is missing.
    /*mutate_fd=*/
    [](int fd, grpc_socket_mutator* m) {
      return Mutate(fd, GRPC_FD_CLIENT_CONNECTION_USAGE, static_cast<TuningMutator*>(m)->tuning);
    },
    /*compare=*/
    [](grpc_socket_mutator* a, grpc_socket_mutator* b) {
      const int x = static_cast<TuningMutator*>(a)->tuning.tcp_rto_min_us;
      const int y = static_cast<TuningMutator*>(b)->tuning.tcp_rto_min_us;
      return x < y ? -1 : (x > y ? 1 : 0);
    },
    /*destroy=*/[](grpc_socket_mutator* m) { delete static_cast<TuningMutator*>(m); },
    /*mutate_fd_2=*/
    [](const grpc_mutate_socket_info* info, grpc_socket_mutator* m) {
      const grpc_fd_usage usage =
          info->usage <= GRPC_FD_SERVER_CONNECTION_USAGE ? info->usage
                                                         : GRPC_FD_CLIENT_CONNECTION_USAGE;
      return Mutate(info->fd, usage, static_cast<TuningMutator*>(m)->tuning);
    },
};

// A new mutator holding one reference, which ChannelArguments takes over.
grpc_socket_mutator* NewMutator(const SocketTuning& tuning) {
  auto* m = new TuningMutator;
  m->tuning = tuning;
  grpc_socket_mutator_init(m, &TuningMutator::kVtable);
  return m;
}

class TuningOption : public grpc::ServerBuilderOption {
 public:
  explicit TuningOption(const SocketTuning& tuning) : tuning_(tuning) {}
  void UpdateArguments(grpc::ChannelArguments* args) override {
    args->SetSocketMutator(NewMutator(tuning_));
  }
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>*) override {}

 private:
  SocketTuning tuning_;
};

}  // namespace

absl::Status CheckSocketTuning(const SocketTuning& tuning) {
  if (tuning.tcp_rto_min_us == 0) return absl::OkStatus();
  if (tuning.tcp_rto_min_us < 0 || tuning.tcp_rto_min_us > 200000) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tcp_rto_min_us: must be 0 (the system's floor) or in [1, 200000] "
                     "microseconds, got ", tuning.tcp_rto_min_us));
  }
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  int read_back = 0;
  const bool ok = SetRtoMin(fd, tuning.tcp_rto_min_us, &read_back);
  const int err = errno;
  close(fd);
  if (ok) return absl::OkStatus();
  if (err == ENOPROTOOPT) {
    return absl::UnimplementedError(
        "--tcp_rto_min_us: this kernel has no per-socket retransmission-timeout floor "
        "(TCP_RTO_MIN_US, Linux 6.15 or later); the system's floor "
        "(net.ipv4.tcp_rto_min_us) stays");
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "--tcp_rto_min_us: the kernel refuses ", tuning.tcp_rto_min_us,
      " microseconds (", std::strerror(err),
      "); it must be longer than one clock tick (4000 at HZ=250) and at most 200000"));
}

void ApplySocketTuning(const SocketTuning& tuning, grpc::ChannelArguments* args) {
  if (tuning.tcp_rto_min_us == 0) return;
  args->SetSocketMutator(NewMutator(tuning));
}

void ApplySocketTuning(const SocketTuning& tuning, grpc::ServerBuilder* builder) {
  if (tuning.tcp_rto_min_us == 0) return;
  builder->SetOption(std::make_unique<TuningOption>(tuning));
}

SocketTuningCounts GetSocketTuningCounts() {
  SocketTuningCounts c;
  c.client_connections = g_tuned[GRPC_FD_CLIENT_CONNECTION_USAGE].load(std::memory_order_relaxed);
  c.server_listeners = g_tuned[GRPC_FD_SERVER_LISTENER_USAGE].load(std::memory_order_relaxed);
  c.server_connections = g_tuned[GRPC_FD_SERVER_CONNECTION_USAGE].load(std::memory_order_relaxed);
  c.refused = g_refused.load(std::memory_order_relaxed);
  c.last_read_back_us = g_last_read_back_us.load(std::memory_order_relaxed);
  return c;
}

}  // namespace tessera
