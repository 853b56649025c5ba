// The client's end of a ParameterService.Session stream, with pushes whose
// tensor payloads go to gRPC without a serialisation copy.
//
// A generated stub serialises a ClientMessage by copying every payload byte
// into gRPC's buffers, after the caller has already encoded it into the
// message: two passes over every gradient byte before the kernel's own.
// PushSerializer writes the same protobuf bytes, but frames a push by hand:
// the small fields go into a header, and each block's payload is handed to
// gRPC as a slice of a buffer the worker encoded it into. The server parses
// the bytes as an ordinary ClientMessage.

#ifndef TESSERA_COMMON_SESSION_STREAM_H_
#define TESSERA_COMMON_SESSION_STREAM_H_

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/sync_stream.h>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "proto/tessera.pb.h"

namespace tessera {

// Payloads shorter than this are copied into the header: a slice of their
// own costs more than the copy.
inline constexpr size_t kMinZeroCopyPayload = 4096;

// Builds push messages as gRPC byte buffers whose payload slices point into
// buffers this class hands out. A buffer lives as long as its owner here or
// any slice gRPC still holds, whichever is longer, so a stream that breaks
// with a push in flight never leaves gRPC pointing at freed or rewritten
// memory. Not thread-safe (gRPC's releases are).
class PushSerializer {
 public:
  PushSerializer() = default;
  PushSerializer(const PushSerializer&) = delete;
  PushSerializer& operator=(const PushSerializer&) = delete;
  ~PushSerializer();

  // Memory for the payloads of the next push: `bytes` bytes, 64-byte
  // aligned, that no slice of an earlier push points at (a buffer gRPC
  // still holds is left to it and a new one taken). Valid until the next
  // call; buffers are reused from push to push, so their pages stay warm.
  absl::Span<char> Allocate(size_t bytes);

  // Writes `message` into `out`: the bytes message.SerializeToString()
  // would give once block i's `data` is replaced by payloads[i] wherever
  // payloads[i].data() is not null (blocks with a null view send their own
  // `data`). Payload bytes inside the last Allocate()'s span go as slices
  // of it, without a copy; everything else is copied. `message` must carry
  // a push and nothing else (no hello, no pull, no unknown fields), and
  // `payloads` must be empty or hold one view per block; kInvalidArgument
  // otherwise.
  absl::Status Serialize(const tessera::v1::ClientMessage& message,
                         absl::Span<const absl::string_view> payloads, grpc::ByteBuffer* out);

  // The same for blocks [begin, end) only, with push.more_parts set to
  // `more_parts`: one part of a push sent in several messages.
  absl::Status SerializePart(const tessera::v1::ClientMessage& message,
                             absl::Span<const absl::string_view> payloads, int begin, int end,
                             bool more_parts, grpc::ByteBuffer* out);

  // Buffers gRPC holds slices of (for tests).
  int buffers_held_by_grpc() const;

 private:
  struct Buffer;
  static void Unref(void* buffer);

  // Buffers owned here; the last one is the current (Allocate's).
  std::vector<Buffer*> pool_;
  std::string header_;  // the fields around the payloads, reused
  // Where each zero-copy payload goes: after header_[0, cut).
  std::vector<std::pair<size_t, absl::string_view>> cuts_;
  std::vector<grpc::Slice> slices_;
};

// One Session stream carrying raw byte buffers: requests serialised by the
// caller (PushSerializer) or by protobuf, replies parsed here. Not
// thread-safe: one caller writes and reads.
class SessionStream {
 public:
  // Opens the stream on `channel`; `context` must outlive it.
  SessionStream(const std::shared_ptr<grpc::Channel>& channel, grpc::ClientContext* context);
  ~SessionStream();

  // Sends a request serialised by protobuf. False when the stream is broken
  // (Finish() says why).
  bool Write(const tessera::v1::ClientMessage& message);

  // How WritePush cuts a push into parts (PushRequest.more_parts).
  struct Parts {
    // A part ends once it holds at least this many payload bytes (0: never
    // for this reason).
    int64_t min_bytes = 0;
    // When set, a part also ends after block i when cut_after(i) is true.
    std::function<bool(int i)> cut_after;
    // When set, called with each part's block range [begin, end) just
    // before the part is framed: the caller can fill those payloads then,
    // while the server reads the part before. Returning false stops the
    // push there (WritePush returns false, local_error() kCancelled).
    std::function<bool(int begin, int end)> before_part;
  };

  // Sends the push in `message` through `serializer` (see there for
  // `payloads`), cut into parts of whole blocks as `parts` says, so that
  // the server works on one part while the next is on its way; one message
  // when no rule cuts. False when the stream is broken (Finish() says why),
  // the message cannot be framed or before_part stopped it (local_error()
  // says why).
  bool WritePush(const tessera::v1::ClientMessage& message,
                 absl::Span<const absl::string_view> payloads, PushSerializer* serializer,
                 const Parts& parts);

  // Reads the next reply into `reply` (its buffers are reused). False when
  // the stream ended, or when the reply does not parse (local_error() is
  // set then).
  bool Read(tessera::v1::ServerMessage* reply);

  bool WritesDone();
  grpc::Status Finish();

  // Why the last Write or Read failed on this end (a message that cannot
  // be framed, a reply that does not parse); OK when the stream broke.
  const absl::Status& local_error() const { return local_error_; }

 private:
  std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>> stream_;
  grpc::ByteBuffer in_;
  absl::Status local_error_;
};

}  // namespace tessera

#endif  // TESSERA_COMMON_SESSION_STREAM_H_
