// Pushes sent in parts (PushRequest.more_parts) on a Session stream: the
// messages a stream brings are offered here in order, and the parts of a
// push gathered until its last one arrives, so that the rest of the server
// only ever sees whole pushes.

#ifndef TESSERA_SERVER_PUSH_PARTS_H_
#define TESSERA_SERVER_PUSH_PARTS_H_

#include <cstdint>

#include "absl/status/status.h"
#include "proto/tessera.pb.h"

namespace tessera {

// One per stream. Not thread-safe.
class PushPartGatherer {
 public:
  // A push in parts may carry at most `max_blocks` blocks and `max_bytes`
  // payload and index bytes in all.
  PushPartGatherer(int max_blocks, int64_t max_bytes)
      : max_blocks_(max_blocks), max_bytes_(max_bytes) {}

  enum class Action {
    kHandle,  // handle the message Offer points at, and reply
    kWait,    // a part was gathered: nothing to do until the next message
    kDrop,    // a later part of a refused push: ignored, no reply
    kRefuse,  // reply to this message's request id with the error
  };

  // Offers the next message read from the stream. kHandle sets *handle to
  // `message` itself or, when it completes a push in parts, to the whole
  // push gathered. A part's payload buffers are swapped into the gathered
  // push (not copied), and `message` gets others to parse into. A part that
  // does not continue the push begun (request id, step, flags), a push that
  // outgrows the limits, a part that carries a hello or pull too, and
  // another request in the middle of a push in parts are refused
  // (kInvalidArgument in *error); the later parts of a refused push are
  // dropped.
  Action Offer(tessera::v1::ClientMessage* message,
               const tessera::v1::ClientMessage** handle, absl::Status* error);

 private:
  absl::Status Add(tessera::v1::ClientMessage* part);

  const int max_blocks_;
  const int64_t max_bytes_;
  bool active_ = false;  // a push in parts is being gathered
  int64_t bytes_ = 0;
  tessera::v1::ClientMessage gathered_;
  bool dropping_ = false;  // the later parts of request dropping_id_ are ignored
  uint64_t dropping_id_ = 0;
};

}  // namespace tessera

#endif  // TESSERA_SERVER_PUSH_PARTS_H_
