// Same-host fast path: block payloads through a POSIX shared-memory region
// instead of the gRPC stream.
//
// A worker whose server is on the same host (loopback or Unix-socket
// address) creates one region per stream and names it in its Hello; the
// server opens and checks it and says so in its reply. From then on the
// stream still carries every message, in order, but a block's bytes may lie
// in the region (TensorBlock.shm_offset/shm_size) instead of in `data`. The
// stream's request/reply order is the only synchronisation needed: a worker
// writes the request area only before sending a request and reads the reply
// area only after its reply arrived; the server reads the request area
// between receiving a request and replying, and writes the reply area just
// before replying. A new stream (after a reconnect) gets a new region.
//
// Layout: a 4 KiB header (magic, a random 128-bit nonce, the two areas'
// sizes), then the request area, then the reply area. The worker removes the
// name as soon as the server has mapped the region, so nothing is left in
// /dev/shm once both processes are gone (or when the server declined).
//
// Checks on the server side, before anything is mapped: the name is
// "/tessera-" plus [0-9a-f-], the object is a regular file owned by the
// server's own user, its size is the announced one and at most the caller's
// bound, and the header's magic, sizes and nonce match the Hello. A remote
// client cannot name a region: the server only accepts loopback and
// Unix-socket peers (ParameterServiceImpl), and the nonce proves the client
// can read the region. Once the name is removed only the worker that made
// the region can still write it; the server reads push payloads in place
// after validating them, so it trusts that worker not to rewrite its
// request area during an exchange (docs/DESIGN.md, "Same-host fast path").

#ifndef TESSERA_COMMON_SHARED_REGION_H_
#define TESSERA_COMMON_SHARED_REGION_H_

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "proto/tessera.pb.h"

namespace tessera {

class SharedRegion {
 public:
  static constexpr uint64_t kHeaderBytes = 4096;

  // Worker side: creates and maps a new region with the given area sizes
  // (each rounded up to 4 KiB). kUnavailable when /dev/shm cannot hold it.
  static absl::StatusOr<std::unique_ptr<SharedRegion>> Create(uint64_t request_bytes,
                                                              uint64_t reply_bytes);

  // Server side: opens and maps `name` after the checks above.
  // kInvalidArgument or kPermissionDenied saying which check failed;
  // kNotFound when no such object exists on this host.
  static absl::StatusOr<std::unique_ptr<SharedRegion>> Open(const std::string& name,
                                                            uint64_t size,
                                                            absl::string_view nonce,
                                                            uint64_t max_size);

  SharedRegion(const SharedRegion&) = delete;
  SharedRegion& operator=(const SharedRegion&) = delete;
  // Unmaps; the creator also removes the name if it still exists.
  ~SharedRegion();

  // Removes the name; both sides keep their mappings. Idempotent.
  void Unlink();

  const std::string& name() const { return name_; }
  uint64_t size() const { return size_; }
  absl::string_view nonce() const { return nonce_; }
  absl::Span<char> request_area() const { return {base_ + kHeaderBytes, request_bytes_}; }
  absl::Span<char> reply_area() const {
    return {base_ + kHeaderBytes + request_bytes_, reply_bytes_};
  }

 private:
  SharedRegion() = default;

  std::string name_;
  bool owner_ = false;  // created here: unlink on destruction
  bool linked_ = false;
  char* base_ = nullptr;
  uint64_t size_ = 0;
  uint64_t request_bytes_ = 0;
  uint64_t reply_bytes_ = 0;
  std::string nonce_;
};

// Writes `values` in `dtype` into `out` (exactly values.size() *
// DTypeSize(dtype) bytes of a region's area), as EncodeTo does, but F32
// payloads with non-temporal stores: the bytes are read next by the other
// process, on another core, so pulling the lines into this core's cache
// first only costs (measured: about 3% on 1 MiB pushes).
void EncodeToShared(tessera::v1::DType dtype, absl::Span<const float> values,
                    absl::Span<char> out);

// Payloads in an area start on 64-byte boundaries: the first byte after a
// payload ending at `end` where the next may start.
inline uint64_t AlignPayload(uint64_t end) { return (end + 63) / 64 * 64; }

// Whether a payload of `bytes` fits in an area of `area_bytes` at `used`,
// and where the next payload may start: past it when it fits, else `used`.
inline bool PayloadFits(uint64_t used, uint64_t bytes, uint64_t area_bytes) {
  return bytes > 0 && used <= area_bytes && bytes <= area_bytes - used;
}
inline uint64_t NextPayloadOffset(uint64_t used, uint64_t bytes, uint64_t area_bytes) {
  return PayloadFits(used, bytes, area_bytes) ? std::min(AlignPayload(used + bytes), area_bytes)
                                              : used;
}

// Writes `values` in `dtype` as `block`'s payload: into `area` at *used
// (EncodeToShared; shm_offset/shm_size set, `data` cleared) when it fits,
// and *used moves to NextPayloadOffset; otherwise inline in `data` (shm
// fields cleared). An empty `area` means no region: always inline. Blocks
// may be written in any order, each with the *used the blocks before it
// would leave (NextPayloadOffset).
void EncodeBlockPayload(tessera::v1::DType dtype, absl::Span<const float> values,
                        absl::Span<char> area, uint64_t* used,
                        tessera::v1::TensorBlock* block);

// Room one area needs for `blocks` payloads of `payload_bytes` in all,
// each starting on a 64-byte boundary; and the size of a region with two
// such areas (what a server accepts at most).
inline uint64_t SharedAreaBytes(uint64_t payload_bytes, uint64_t blocks) {
  return payload_bytes + 64 * blocks;
}
inline uint64_t SharedRegionBytes(uint64_t payload_bytes, uint64_t blocks) {
  return SharedRegion::kHeaderBytes + 2 * ((SharedAreaBytes(payload_bytes, blocks) + 4095) / 4096 * 4096);
}

// Copies each block's `data` into `area`, back to back in order while it
// fits, sets the block's shm_offset/shm_size and parks the (now unsent)
// bytes in `parked`, so that the message carries no payload on the wire.
// Blocks that do not fit stay inline, and blocks whose bytes the sender
// already wrote into the area (shm_size set, no data) keep their range:
// offloaded payloads go after them. RestoreBlocks puts back exactly the
// bytes OffloadBlocks moved (the message's buffers keep their capacity from
// one use to the next).
void OffloadBlocks(google::protobuf::RepeatedPtrField<tessera::v1::TensorBlock>* blocks,
                   absl::Span<char> area, std::vector<std::string>* parked);
void RestoreBlocks(google::protobuf::RepeatedPtrField<tessera::v1::TensorBlock>* blocks,
                   std::vector<std::string>* parked);

// A block's payload: its `data`, or its range of `area` when shm_size is
// set. kInvalidArgument naming the block when the range leaves the area,
// when `data` is also set, or when `area` is empty (no region).
absl::StatusOr<absl::string_view> BlockPayload(const tessera::v1::TensorBlock& block,
                                               absl::Span<const char> area);

// Every block's payload (BlockPayload) in block order, into `out` (reused);
// the first error as BlockPayload. How the server reads a push: the views
// go to ShardStore::Push, so payloads in the region are never copied.
absl::Status ResolvePayloads(
    const google::protobuf::RepeatedPtrField<tessera::v1::TensorBlock>& blocks,
    absl::Span<const char> area, std::vector<absl::string_view>* out);

// Copies every shared-memory payload into its block's `data` and clears the
// block's shm fields (a worker taking its push back from a region it is
// about to drop). Errors as BlockPayload; on error the blocks are left as
// they were.
absl::Status MaterializeBlocks(
    google::protobuf::RepeatedPtrField<tessera::v1::TensorBlock>* blocks,
    absl::Span<const char> area);

// Whether `address` (a gRPC target) names this host: 127.0.0.0/8,
// localhost, [::1] or a Unix-domain socket.
bool IsLocalTarget(absl::string_view address);

// Whether a server-side peer string (grpc::ServerContext::peer()) is a
// loopback or Unix-domain client.
bool IsLocalPeer(absl::string_view peer);

}  // namespace tessera

#endif  // TESSERA_COMMON_SHARED_REGION_H_
