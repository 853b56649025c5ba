// Helpers for the Session stream's messages (proto/tessera.proto).

#ifndef TESSERA_COMMON_PROTOCOL_H_
#define TESSERA_COMMON_PROTOCOL_H_

#include "proto/tessera.pb.h"

namespace tessera {

// Which request a ClientMessage carries. ClientMessage keeps hello, push and
// pull as plain fields (not a oneof, so that a reused message keeps its
// buffers), so "exactly one is set" is checked here.
enum class RequestKind { kNone, kHello, kPush, kPull, kSeveral };

inline RequestKind KindOf(const tessera::v1::ClientMessage& m) {
  const int set = int{m.has_hello()} + int{m.has_push()} + int{m.has_pull()};
  if (set == 0) return RequestKind::kNone;
  if (set > 1) return RequestKind::kSeveral;
  if (m.has_hello()) return RequestKind::kHello;
  return m.has_push() ? RequestKind::kPush : RequestKind::kPull;
}

}  // namespace tessera

#endif  // TESSERA_COMMON_PROTOCOL_H_
