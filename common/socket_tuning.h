// TCP options that gRPC does not set itself, applied to every socket a
// channel or server opens (gRPC's socket-mutator hook).
//
// The one that matters is the retransmission-timeout floor. Linux never lets
// a TCP retransmission timer fire sooner than 200 ms, a figure chosen for the
// Internet; inside a cluster a round trip takes tens of microseconds, so every
// tail segment or retransmission that is lost stalls a step for 200 ms or
// more. Linux 6.15 and later take a per-socket floor (TCP_RTO_MIN_US): more
// than one clock tick, at most 200 ms, rounded up to whole ticks (5000 us
// becomes 8 ms at HZ=250). The timer still follows the measured round trip
// (srtt + 4 * rttvar); only its floor moves. See docs/DESIGN.md, "Lossy
// networks".
//
// The congestion-control algorithm can be chosen per socket too
// (TCP_CONGESTION): BBR does not read random loss as congestion, which
// keeps a lossy link's window open; on loopback, where there is no one to
// share a link with, its pacing only costs speed, so connections between
// loopback addresses use cubic unless an algorithm was asked for.

#ifndef TESSERA_COMMON_SOCKET_TUNING_H_
#define TESSERA_COMMON_SOCKET_TUNING_H_

#include <cstdint>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tessera {

struct SocketTuning {
  // Floor of the TCP retransmission timeout in microseconds; 0 leaves the
  // system's (net.ipv4.tcp_rto_min_us, 200 ms unless changed).
  int tcp_rto_min_us = 0;
  // TCP congestion-control algorithm (for example "bbr"); empty leaves the
  // system's (net.ipv4.tcp_congestion_control).
  std::string tcp_congestion;
  // Algorithm for connections between loopback addresses when
  // tcp_congestion is empty; empty leaves the system's there too.
  std::string loopback_congestion;

  bool empty() const {
    return tcp_rto_min_us == 0 && tcp_congestion.empty() && loopback_congestion.empty();
  }
};

// What the processes give loopback_congestion when the kernel lets them
// use it.
inline constexpr char kLoopbackCongestion[] = "cubic";

// `tuning` (its floor and algorithm) made ready for the sockets of a
// process, as servers, workers and the transport bench use it:
// - checked with CheckSocketTuning, whose errors it returns, except that on
//   a kernel without a per-socket floor (kUnimplemented) the floor becomes
//   0, the system's, and `*no_floor` (when given) gets the reason;
// - loopback_congestion set to kLoopbackCongestion when the kernel lets
//   this process use it (checked on a scratch socket), else left empty (the
//   system's algorithm).
absl::StatusOr<SocketTuning> ResolveSocketTuning(SocketTuning tuning,
                                                 std::string* no_floor = nullptr);

// `tuning` for a channel to `target`: with loopback_congestion in
// tcp_congestion when the target is a loopback address and no algorithm
// was asked for. (A client socket is tuned before it connects, so the
// choice is made per channel; servers look at each accepted connection's
// peer.)
SocketTuning ForTarget(const SocketTuning& tuning, absl::string_view target);

// The default of the processes' --tcp_rto_min_us flag.
inline constexpr int kDefaultTcpRtoMinUs = 5000;

// loopback_congestion is not checked (ResolveSocketTuning leaves it empty
// when the kernel refuses it on a scratch socket).
//
// kInvalidArgument naming the flag when the value is outside what Linux
// accepts (0, or 1..200000 microseconds; the kernel also refuses one clock
// tick or less, which this function checks on a scratch socket), or when
// this kernel does not offer the congestion-control algorithm to this
// process (checked the same way).
// kUnimplemented when the kernel has no per-socket floor (before 6.15): the
// caller warns and goes on with the system's floor. The algorithm is
// checked first, so kUnimplemented means it passed.
absl::Status CheckSocketTuning(const SocketTuning& tuning);

// Applies `tuning` to every socket of channels created with `args`, or of
// the server built by `builder` (its listening socket and the connections
// it accepts). No-op when nothing is set. A socket the kernel refuses an
// option for keeps working with the system's defaults (counted in
// SocketTuningCounts()).
void ApplySocketTuning(const SocketTuning& tuning, grpc::ChannelArguments* args);
void ApplySocketTuning(const SocketTuning& tuning, grpc::ServerBuilder* builder);

// A channel to `target` whose sockets carry ForTarget(tuning, target), with
// `args` for everything else: how every channel of a server or worker is
// made, so that none keeps the system's 200 ms floor by accident.
std::shared_ptr<grpc::Channel> CreateTunedChannel(
    const std::string& target, const std::shared_ptr<grpc::ChannelCredentials>& credentials,
    const SocketTuning& tuning, grpc::ChannelArguments args = {});

// What the hook did in this process, for tests and diagnostics.
struct SocketTuningCounts {
  // Sockets whose options were all set and read back, by use.
  int64_t client_connections = 0;
  int64_t server_listeners = 0;
  int64_t server_connections = 0;
  int64_t refused = 0;        // sockets where a setsockopt failed
  int last_read_back_us = 0;  // the floor the kernel reported for the latest one
  std::string last_congestion;  // the algorithm it reported for the latest one
};
SocketTuningCounts GetSocketTuningCounts();

}  // namespace tessera

#endif  // TESSERA_COMMON_SOCKET_TUNING_H_
