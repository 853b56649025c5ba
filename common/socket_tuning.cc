#include "common/socket_tuning.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>

#include <grpc/support/sync.h>
#include <grpcpp/server_builder.h>
#include <grpcpp/support/channel_arguments.h>

#include "absl/base/thread_annotations.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/shared_region.h"
#include "common/status_macros.h"

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

// The kernel's limit on an algorithm's name, terminating NUL included
// (TCP_CA_NAME_MAX in the kernel's include/net/tcp.h).
constexpr size_t kCongestionNameMax = 16;

// Linux 6.15 <linux/tcp.h>; bookworm's headers predate it.
#ifndef TCP_RTO_MIN_US
#define TCP_RTO_MIN_US 45
#endif

std::atomic<int64_t> g_tuned[3] = {0, 0, 0};  // by grpc_fd_usage
std::atomic<int64_t> g_refused{0};
std::atomic<int> g_last_read_back_us{0};
ABSL_CONST_INIT absl::Mutex g_congestion_mu(absl::kConstInit);
std::string* g_last_congestion ABSL_GUARDED_BY(g_congestion_mu) = nullptr;

// Sets the floor on `fd` and reads it back. errno is left from a failure.
bool SetRtoMin(int fd, int us, int* read_back) {
  if (setsockopt(fd, IPPROTO_TCP, TCP_RTO_MIN_US, &us, sizeof(us)) != 0) return false;
  socklen_t len = sizeof(*read_back);
  return getsockopt(fd, IPPROTO_TCP, TCP_RTO_MIN_US, read_back, &len) == 0;
}

// Sets the congestion-control algorithm on `fd` and reads it back. errno is
// left from a failure.
bool SetCongestion(int fd, const std::string& name, std::string* read_back) {
  if (setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, name.data(),
                 static_cast<socklen_t>(name.size())) != 0) {
    return false;
  }
  char buf[kCongestionNameMax] = {};
  socklen_t len = sizeof(buf);
  if (getsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, buf, &len) != 0) return false;
  read_back->assign(buf, strnlen(buf, std::min<size_t>(len, sizeof(buf))));
  return true;
}

// Whether the connected socket's peer is a loopback address (127.0.0.0/8,
// ::1, or 127.x mapped into IPv6).
bool PeerIsLoopback(int fd) {
  sockaddr_storage addr;
  socklen_t len = sizeof(addr);
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) return false;
  if (addr.ss_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(&addr);
    return (ntohl(in->sin_addr.s_addr) >> 24) == 127;
  }
  if (addr.ss_family == AF_INET6) {
    const in6_addr& a = reinterpret_cast<const sockaddr_in6*>(&addr)->sin6_addr;
    if (IN6_IS_ADDR_LOOPBACK(&a)) return true;
    return IN6_IS_ADDR_V4MAPPED(&a) && a.s6_addr[12] == 127;
  }
  return false;
}

struct TuningMutator : grpc_socket_mutator {
  SocketTuning tuning;

  static bool Mutate(int fd, grpc_fd_usage usage, const SocketTuning& tuning) {
    sockaddr_storage addr;
    socklen_t len = sizeof(addr);
    // Unix-domain sockets have no retransmissions and no congestion control.
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0 ||
        (addr.ss_family != AF_INET && addr.ss_family != AF_INET6)) {
      return true;
    }
    std::string congestion = tuning.tcp_congestion;
    if (congestion.empty() && usage == GRPC_FD_SERVER_CONNECTION_USAGE &&
        !tuning.loopback_congestion.empty() && PeerIsLoopback(fd)) {
      congestion = tuning.loopback_congestion;
    }
    bool ok = true;
    if (tuning.tcp_rto_min_us > 0) {
      int read_back = 0;
      ok = SetRtoMin(fd, tuning.tcp_rto_min_us, &read_back);
      if (ok) g_last_read_back_us.store(read_back, std::memory_order_relaxed);
    }
    if (ok && !congestion.empty()) {
      std::string read_back;
      ok = SetCongestion(fd, congestion, &read_back);
      if (ok) {
        absl::MutexLock lock(&g_congestion_mu);
        if (g_last_congestion == nullptr) g_last_congestion = new std::string;
        *g_last_congestion = std::move(read_back);
      }
    }
    if (ok) {
      g_tuned[usage].fetch_add(1, std::memory_order_relaxed);
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
      const SocketTuning& x = static_cast<TuningMutator*>(a)->tuning;
      const SocketTuning& y = static_cast<TuningMutator*>(b)->tuning;
      if (x.tcp_rto_min_us != y.tcp_rto_min_us) return x.tcp_rto_min_us < y.tcp_rto_min_us ? -1 : 1;
      int c = x.tcp_congestion.compare(y.tcp_congestion);
      if (c == 0) c = x.loopback_congestion.compare(y.loopback_congestion);
      return c < 0 ? -1 : (c > 0 ? 1 : 0);
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

// The contents of a /proc/sys file without its newline, or "?".
std::string ReadSysctl(const char* path) {
  std::ifstream in(path);
  std::string line;
  if (!std::getline(in, line)) return "?";
  return line;
}

absl::Status CheckCongestion(const std::string& name) {
  if (name.empty()) return absl::OkStatus();
  if (name.size() >= kCongestionNameMax) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tcp_congestion: '", name, "' is longer than Linux allows (", kCongestionNameMax - 1,
        " characters)"));
  }
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  std::string read_back;
  const bool ok = SetCongestion(fd, name, &read_back);
  const int err = errno;
  close(fd);
  if (ok) return absl::OkStatus();
  if (err == EPERM) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tcp_congestion: this process may not use '", name,
        "' (net.ipv4.tcp_allowed_congestion_control: ",
        ReadSysctl("/proc/sys/net/ipv4/tcp_allowed_congestion_control"),
        "; CAP_NET_ADMIN may use any available one)"));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "--tcp_congestion: this kernel has no '", name, "' (", std::strerror(err),
      "; net.ipv4.tcp_available_congestion_control: ",
      ReadSysctl("/proc/sys/net/ipv4/tcp_available_congestion_control"), ")"));
}

}  // namespace

absl::Status CheckSocketTuning(const SocketTuning& tuning) {
  TESSERA_RETURN_IF_ERROR(CheckCongestion(tuning.tcp_congestion));
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
  if (tuning.empty()) return;
  args->SetSocketMutator(NewMutator(tuning));
}

void ApplySocketTuning(const SocketTuning& tuning, grpc::ServerBuilder* builder) {
  if (tuning.empty()) return;
  builder->SetOption(std::make_unique<TuningOption>(tuning));
}

std::shared_ptr<grpc::Channel> CreateTunedChannel(
    const std::string& target, const std::shared_ptr<grpc::ChannelCredentials>& credentials,
    const SocketTuning& tuning, grpc::ChannelArguments args) {
  ApplySocketTuning(ForTarget(tuning, target), &args);
  return grpc::CreateCustomChannel(target, credentials, args);
}

absl::StatusOr<SocketTuning> ResolveSocketTuning(SocketTuning tuning, std::string* no_floor) {
  const absl::Status s = CheckSocketTuning(tuning);
  if (absl::IsUnimplemented(s)) {
    if (no_floor != nullptr) *no_floor = std::string(s.message());
    tuning.tcp_rto_min_us = 0;
  } else if (!s.ok()) {
    return s;
  }
  tuning.loopback_congestion.clear();
  if (CheckCongestion(kLoopbackCongestion).ok()) tuning.loopback_congestion = kLoopbackCongestion;
  return tuning;
}

SocketTuning ForTarget(const SocketTuning& tuning, absl::string_view target) {
  SocketTuning t = tuning;
  if (t.tcp_congestion.empty() && !t.loopback_congestion.empty() && IsLocalTarget(target) &&
      !absl::StartsWith(target, "unix")) {
    t.tcp_congestion = t.loopback_congestion;
  }
  return t;
}

SocketTuningCounts GetSocketTuningCounts() {
  SocketTuningCounts c;
  c.client_connections = g_tuned[GRPC_FD_CLIENT_CONNECTION_USAGE].load(std::memory_order_relaxed);
  c.server_listeners = g_tuned[GRPC_FD_SERVER_LISTENER_USAGE].load(std::memory_order_relaxed);
  c.server_connections = g_tuned[GRPC_FD_SERVER_CONNECTION_USAGE].load(std::memory_order_relaxed);
  c.refused = g_refused.load(std::memory_order_relaxed);
  c.last_read_back_us = g_last_read_back_us.load(std::memory_order_relaxed);
  absl::MutexLock lock(&g_congestion_mu);
  if (g_last_congestion != nullptr) c.last_congestion = *g_last_congestion;
  return c;
}

}  // namespace tessera
