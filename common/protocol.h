// Helpers for the Session stream's messages (proto/tessera.proto).

#ifndef TESSERA_COMMON_PROTOCOL_H_
#define TESSERA_COMMON_PROTOCOL_H_

#include <cstdint>

#include "proto/tessera.pb.h"

namespace tessera {

// Version of the Session stream's protocol (Hello.protocol_version,
// ServerMessage.protocol_version). Both ends refuse a peer of another
// version at the Hello. Raise it with any change that a peer of the
// previous release would misread or refuse later in the stream (a new kind
// of message or part, a field whose absence changes meaning), not for
// fields an older peer may safely ignore. Version 1: pushes and replies in
// parts (PushRequest.more_parts, Hello.reply_part_bytes), payloads in a
// same-host region (TensorBlock.shm_offset), sparse blocks.
inline constexpr uint32_t kSessionProtocolVersion = 1;

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
