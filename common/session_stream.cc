#include "common/session_stream.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <new>

#include <grpcpp/impl/codegen/proto_utils.h>
#include <grpcpp/impl/rpc_method.h>

#include "absl/strings/str_cat.h"
#include "proto/tessera.grpc.pb.h"

namespace tessera {
namespace {

using tessera::v1::ClientMessage;
using tessera::v1::PushRequest;
using tessera::v1::ServerMessage;
using tessera::v1::TensorBlock;

// Protobuf wire format: a field's tag is (number << 3) | wire type.
constexpr uint8_t Tag(int field, int wire_type) {
  return static_cast<uint8_t>((field << 3) | wire_type);
}
constexpr int kVarint = 0;
constexpr int kLen = 2;

size_t VarintSize(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    ++n;
  }
  return n;
}

void AppendVarint(uint64_t v, std::string* out) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

// int32, int64 and enum fields are encoded as their 64-bit two's complement.
uint64_t AsVarint(int64_t v) { return static_cast<uint64_t>(v); }

// Size of a varint field holding `v` (0 when proto3 omits it: v == 0).
size_t VarintFieldSize(uint64_t v) { return v == 0 ? 0 : 1 + VarintSize(v); }
size_t LenFieldSize(size_t len) { return 1 + VarintSize(len) + len; }
size_t BytesFieldSize(size_t len) { return len == 0 ? 0 : LenFieldSize(len); }

void AppendVarintField(uint8_t tag, uint64_t v, std::string* out) {
  if (v == 0) return;
  out->push_back(static_cast<char>(tag));
  AppendVarint(v, out);
}

// The bytes block i of `push` sends as its data: payloads[i] where that is
// set, else the block's own (PushSerializer::Serialize).
absl::string_view BlockData(const PushRequest& push,
                            absl::Span<const absl::string_view> payloads, int i) {
  if (!payloads.empty() && payloads[i].data() != nullptr) return payloads[i];
  return push.blocks(i).data();
}

absl::Status NoUnknownFields(const google::protobuf::Message& m, absl::string_view what) {
  if (!m.GetReflection()->GetUnknownFields(m).empty()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " carries unknown fields"));
  }
  return absl::OkStatus();
}

}  // namespace

struct PushSerializer::Buffer {
  explicit Buffer(size_t n)
      : size(n), data(static_cast<char*>(::operator new(n, std::align_val_t(64)))) {}
  ~Buffer() { ::operator delete(data, std::align_val_t(64)); }
  bool Contains(absl::string_view v) const {
    return v.data() >= data && v.data() + v.size() <= data + size;
  }
  const size_t size;
  char* const data;
  // One for the pool while it is there, one per slice gRPC holds.
  std::atomic<int> refs{1};
};

void PushSerializer::Unref(void* buffer) {
  auto* b = static_cast<Buffer*>(buffer);
  if (b->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) delete b;
}

PushSerializer::~PushSerializer() {
  for (Buffer* b : pool_) Unref(b);
}

int PushSerializer::buffers_held_by_grpc() const {
  int held = 0;
  for (const Buffer* b : pool_) held += b->refs.load(std::memory_order_acquire) > 1 ? 1 : 0;
  return held;
}

absl::Span<char> PushSerializer::Allocate(size_t bytes) {
  bytes = std::max<size_t>(bytes, 64);
  // Prefer a buffer gRPC has let go of that is large enough; keep at most
  // two (the usual case is one: the last push's slices are gone by the
  // time its reply is read).
  for (size_t i = 0; i < pool_.size(); ++i) {
    Buffer* b = pool_[i];
    if (b->size >= bytes && b->refs.load(std::memory_order_acquire) == 1) {
      pool_.erase(pool_.begin() + static_cast<std::ptrdiff_t>(i));
      pool_.push_back(b);  // current
      return absl::MakeSpan(b->data, bytes);
    }
  }
  while (pool_.size() >= 2) {  // gRPC keeps what it still holds
    Unref(pool_.front());
    pool_.erase(pool_.begin());
  }
  pool_.push_back(new Buffer(bytes));
  return absl::MakeSpan(pool_.back()->data, bytes);
}

absl::Status PushSerializer::Serialize(const ClientMessage& message,
                                       absl::Span<const absl::string_view> payloads,
                                       grpc::ByteBuffer* out) {
  return SerializePart(message, payloads, 0, message.push().blocks_size(),
                       message.push().more_parts(), out);
}

absl::Status PushSerializer::SerializePart(const ClientMessage& message,
                                           absl::Span<const absl::string_view> payloads,
                                           int begin, int end, bool more_parts,
                                           grpc::ByteBuffer* out) {
  if (!message.has_push() || message.has_hello() || message.has_pull()) {
    return absl::InvalidArgumentError("a zero-copy push message carries a push and nothing else");
  }
  const PushRequest& push = message.push();
  if (!payloads.empty() && static_cast<int>(payloads.size()) != push.blocks_size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a push of ", push.blocks_size(), " blocks with ", payloads.size(), " payloads"));
  }
  if (begin < 0 || begin > end || end > push.blocks_size()) {
    return absl::InvalidArgumentError(absl::StrCat("blocks [", begin, ", ", end,
                                                   ") of a push of ", push.blocks_size()));
  }
  {
    absl::Status s = NoUnknownFields(message, "the message");
    if (s.ok()) s = NoUnknownFields(push, "the push");
    for (const TensorBlock& b : push.blocks()) {
      if (s.ok()) s = NoUnknownFields(b, "a block");
    }
    if (!s.ok()) return s;
  }
  auto data_of = [&](int i) { return BlockData(push, payloads, i); };
  auto block_size = [&](int i) {
    const TensorBlock& b = push.blocks(i);
    return VarintFieldSize(b.block_id()) + VarintFieldSize(AsVarint(b.dtype())) +
           BytesFieldSize(data_of(i).size()) + (b.sparse() ? 2 : 0) +
           BytesFieldSize(b.indices().size()) + VarintFieldSize(b.shm_offset()) +
           VarintFieldSize(b.shm_size());
  };

  // The fields in field-number order, as protobuf writes them.
  size_t push_size = VarintFieldSize(AsVarint(push.step())) +
                     (push.return_parameters() ? 2 : 0) +
                     VarintFieldSize(AsVarint(push.base_version())) + (more_parts ? 2 : 0);
  for (int i = begin; i < end; ++i) push_size += LenFieldSize(block_size(i));

  header_.clear();
  cuts_.clear();
  AppendVarintField(Tag(1, kVarint), message.request_id(), &header_);  // request_id
  header_.push_back(static_cast<char>(Tag(3, kLen)));                   // push
  AppendVarint(push_size, &header_);
  AppendVarintField(Tag(1, kVarint), AsVarint(push.step()), &header_);  // step
  for (int i = begin; i < end; ++i) {
    const TensorBlock& b = push.blocks(i);
    header_.push_back(static_cast<char>(Tag(2, kLen)));  // blocks
    AppendVarint(block_size(i), &header_);
    AppendVarintField(Tag(1, kVarint), b.block_id(), &header_);
    AppendVarintField(Tag(2, kVarint), AsVarint(b.dtype()), &header_);
    const absl::string_view data = data_of(i);
    if (!data.empty()) {
      header_.push_back(static_cast<char>(Tag(3, kLen)));
      AppendVarint(data.size(), &header_);
      if (data.size() >= kMinZeroCopyPayload) {
        cuts_.emplace_back(header_.size(), data);
      } else {
        header_.append(data.data(), data.size());
      }
    }
    AppendVarintField(Tag(4, kVarint), b.sparse() ? 1 : 0, &header_);
    if (!b.indices().empty()) {
      header_.push_back(static_cast<char>(Tag(5, kLen)));
      AppendVarint(b.indices().size(), &header_);
      header_.append(b.indices());
    }
    AppendVarintField(Tag(6, kVarint), b.shm_offset(), &header_);
    AppendVarintField(Tag(7, kVarint), b.shm_size(), &header_);
  }
  AppendVarintField(Tag(3, kVarint), push.return_parameters() ? 1 : 0, &header_);
  AppendVarintField(Tag(4, kVarint), AsVarint(push.base_version()), &header_);
  AppendVarintField(Tag(5, kVarint), more_parts ? 1 : 0, &header_);

  slices_.clear();
  Buffer* const current = pool_.empty() ? nullptr : pool_.back();
  size_t from = 0;
  for (const auto& [cut, data] : cuts_) {
    if (cut > from) slices_.emplace_back(header_.data() + from, cut - from);  // copied
    if (current != nullptr && current->Contains(data)) {
      current->refs.fetch_add(1, std::memory_order_relaxed);
      // gRPC only reads through this pointer; the API wants it non-const.
      slices_.emplace_back(const_cast<char*>(data.data()), data.size(), &PushSerializer::Unref,
                           current);
    } else {
      slices_.emplace_back(data.data(), data.size());  // not ours to lend: copied
    }
    from = cut;
  }
  if (header_.size() > from) slices_.emplace_back(header_.data() + from, header_.size() - from);
  grpc::ByteBuffer buffer(slices_.data(), slices_.size());
  out->Swap(&buffer);
  slices_.clear();  // the byte buffer holds its own references
  return absl::OkStatus();
}

SessionStream::SessionStream(const std::shared_ptr<grpc::Channel>& channel,
                             grpc::ClientContext* context) {
  static const std::string* const kMethod = new std::string(
      absl::StrCat("/", tessera::v1::ParameterService::service_full_name(), "/Session"));
  const grpc::internal::RpcMethod method(kMethod->c_str(),
                                         grpc::internal::RpcMethod::BIDI_STREAMING, channel);
  stream_.reset(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          channel.get(), method, context));
}

SessionStream::~SessionStream() = default;

bool SessionStream::Write(const ClientMessage& message) {
  grpc::ByteBuffer out;
  bool own_buffer = false;
  if (!grpc::SerializationTraits<ClientMessage>::Serialize(message, &out, &own_buffer).ok()) {
    return false;  // only a message over 2 GiB fails here
  }
  return stream_->Write(out);
}

bool SessionStream::WritePush(const ClientMessage& message,
                              absl::Span<const absl::string_view> payloads,
                              PushSerializer* serializer, const Parts& parts) {
  const PushRequest& push = message.push();
  const int n = push.blocks_size();
  // Blocks [begin, end) as one message; the last carries the push's own flag.
  auto write_part = [&](int begin, int end) {
    grpc::ByteBuffer part;
    absl::Status s = serializer->SerializePart(message, payloads, begin, end,
                                               end == n ? push.more_parts() : true, &part);
    if (!s.ok()) {
      local_error_ = s;
      return false;
    }
    return stream_->Write(part);
  };
  if (n == 0) return write_part(0, 0);  // an empty push is still one message
  int begin = 0;
  int64_t bytes = 0;
  for (int i = 0; i < n; ++i) {
    bytes += static_cast<int64_t>(BlockData(push, payloads, i).size());
    const bool last = i + 1 == n;
    const bool cut = (parts.min_bytes > 0 && bytes >= parts.min_bytes) ||
                     (parts.cut_after != nullptr && parts.cut_after(i));
    if (!last && !cut) continue;
    if (parts.before_part != nullptr && !parts.before_part(begin, i + 1)) {
      local_error_ = absl::CancelledError("the push was stopped between parts");
      return false;
    }
    if (!write_part(begin, i + 1)) return false;
    begin = i + 1;
    bytes = 0;
  }
  return true;
}

bool SessionStream::Read(ServerMessage* reply) {
  if (!stream_->Read(&in_)) return false;
  grpc::Status s = grpc::SerializationTraits<ServerMessage>::Deserialize(&in_, reply);
  if (!s.ok()) {
    local_error_ = absl::DataLossError(absl::StrCat("unparsable reply: ", s.error_message()));
    return false;
  }
  return true;
}

bool SessionStream::WritesDone() { return stream_->WritesDone(); }

grpc::Status SessionStream::Finish() { return stream_->Finish(); }

}  // namespace tessera
