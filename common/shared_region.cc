#include "common/shared_region.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "common/tensor_codec.h"

namespace tessera {
namespace {

constexpr char kMagic[8] = {'T', 'E', 'S', 'S', 'S', 'H', 'M', '1'};
constexpr size_t kNonceBytes = 16;
constexpr absl::string_view kPrefix = "/tessera-";

struct Header {
  char magic[8];
  uint64_t request_bytes;
  uint64_t reply_bytes;
  char nonce[kNonceBytes];
};
static_assert(sizeof(Header) <= SharedRegion::kHeaderBytes);

uint64_t RoundUp4K(uint64_t n) { return (n + 4095) / 4096 * 4096; }

std::string Errno(const char* what) { return absl::StrCat(what, ": ", std::strerror(errno)); }

bool ValidName(absl::string_view name) {
  if (!absl::StartsWith(name, kPrefix) || name.size() > 64 || name.size() == kPrefix.size()) {
    return false;
  }
  for (char c : name.substr(kPrefix.size())) {
    if (!(absl::ascii_isdigit(c) || (c >= 'a' && c <= 'f') || c == '-')) return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SharedRegion>> SharedRegion::Create(uint64_t request_bytes,
                                                                    uint64_t reply_bytes) {
  std::unique_ptr<SharedRegion> r(new SharedRegion);
  r->request_bytes_ = RoundUp4K(request_bytes);
  r->reply_bytes_ = RoundUp4K(reply_bytes);
  r->size_ = kHeaderBytes + r->request_bytes_ + r->reply_bytes_;
  r->nonce_.resize(kNonceBytes);
  if (getrandom(r->nonce_.data(), kNonceBytes, 0) != static_cast<ssize_t>(kNonceBytes)) {
    return absl::UnavailableError(Errno("getrandom"));
  }
  uint64_t tag = 0;
  std::memcpy(&tag, r->nonce_.data(), sizeof(tag));
  r->name_ = absl::StrFormat("%s%x-%016x", kPrefix, getpid(), tag);
  const int fd = shm_open(r->name_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return absl::UnavailableError(Errno(absl::StrCat("shm_open ", r->name_).c_str()));
  r->owner_ = r->linked_ = true;
  // Reserve the pages now (ftruncate alone would leave a sparse object that
  // raises SIGBUS on first touch when /dev/shm is full).
  const int err = posix_fallocate(fd, 0, static_cast<off_t>(r->size_));
  if (err != 0) {
    close(fd);
    return absl::UnavailableError(absl::StrCat("cannot reserve ", r->size_, " bytes in /dev/shm: ",
                                               std::strerror(err)));
  }
  void* p = mmap(nullptr, r->size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return absl::UnavailableError(Errno("mmap"));
  r->base_ = static_cast<char*>(p);
  Header h;
  std::memcpy(h.magic, kMagic, sizeof(kMagic));
  h.request_bytes = r->request_bytes_;
  h.reply_bytes = r->reply_bytes_;
  std::memcpy(h.nonce, r->nonce_.data(), kNonceBytes);
  std::memcpy(r->base_, &h, sizeof(h));
  return r;
}

absl::StatusOr<std::unique_ptr<SharedRegion>> SharedRegion::Open(const std::string& name,
                                                                  uint64_t size,
                                                                  absl::string_view nonce,
                                                                  uint64_t max_size) {
  if (!ValidName(name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("shared-memory name '", name, "' is not /tessera- followed by [0-9a-f-]"));
  }
  if (nonce.size() != kNonceBytes) {
    return absl::InvalidArgumentError(absl::StrCat("shared-memory nonce has ", nonce.size(),
                                                   " bytes, expected ", kNonceBytes));
  }
  if (size < kHeaderBytes || size > max_size) {
    return absl::InvalidArgumentError(absl::StrCat("shared-memory size ", size,
                                                   " is outside [", kHeaderBytes, ", ",
                                                   max_size, "]"));
  }
  const int fd = shm_open(name.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC, 0);
  if (fd < 0) {
    if (errno == ENOENT) {
      return absl::NotFoundError(
          absl::StrCat("no shared-memory object ", name, " on this host"));
    }
    return absl::PermissionDeniedError(Errno(absl::StrCat("shm_open ", name).c_str()));
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    close(fd);
    return absl::PermissionDeniedError(Errno("fstat"));
  }
  if (!S_ISREG(st.st_mode) || st.st_uid != geteuid() ||
      static_cast<uint64_t>(st.st_size) != size) {
    close(fd);
    return absl::PermissionDeniedError(absl::StrCat(
        "shared-memory object ", name, " is not a regular object of ", size,
        " bytes owned by this server's user"));
  }
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return absl::PermissionDeniedError(Errno("mmap"));
  std::unique_ptr<SharedRegion> r(new SharedRegion);
  r->name_ = name;
  r->base_ = static_cast<char*>(p);
  r->size_ = size;
  Header h;
  std::memcpy(&h, r->base_, sizeof(h));
  if (std::memcmp(h.magic, kMagic, sizeof(kMagic)) != 0 ||
      std::memcmp(h.nonce, nonce.data(), kNonceBytes) != 0 || h.request_bytes > size ||
      h.reply_bytes > size || kHeaderBytes + h.request_bytes + h.reply_bytes != size) {
    return absl::PermissionDeniedError(absl::StrCat(
        "shared-memory object ", name, ": header does not match the Hello (magic, nonce or sizes)"));
  }
  // The sizes are read once: later writes to the header change nothing here.
  r->request_bytes_ = h.request_bytes;
  r->reply_bytes_ = h.reply_bytes;
  r->nonce_ = std::string(nonce);
  return r;
}

SharedRegion::~SharedRegion() {
  if (base_ != nullptr) munmap(base_, size_);
  if (owner_) Unlink();
}

void SharedRegion::Unlink() {
  if (!linked_) return;
  shm_unlink(name_.c_str());
  linked_ = false;
}

void OffloadBlocks(google::protobuf::RepeatedPtrField<tessera::v1::TensorBlock>* blocks,
                   absl::Span<char> area, std::vector<std::string>* parked) {
  if (parked->size() < static_cast<size_t>(blocks->size())) parked->resize(blocks->size());
  // Start after payloads the sender already wrote into the area itself.
  uint64_t offset = 0;
  for (const tessera::v1::TensorBlock& b : *blocks) {
    if (b.shm_size() > 0 && b.shm_offset() <= area.size() &&
        b.shm_size() <= area.size() - b.shm_offset()) {
      offset = std::max<uint64_t>(offset, AlignPayload(b.shm_offset() + b.shm_size()));
    }
  }
  offset = std::min<uint64_t>(offset, area.size());
  for (int i = 0; i < blocks->size(); ++i) {
    tessera::v1::TensorBlock* b = blocks->Mutable(i);
    const std::string& data = b->data();
    if (data.empty() || data.size() > area.size() - offset) continue;
    std::memcpy(area.data() + offset, data.data(), data.size());
    b->set_shm_offset(offset);
    b->set_shm_size(data.size());
    offset = std::min<uint64_t>(AlignPayload(offset + data.size()), area.size());
    std::string& slot = (*parked)[i];
    slot.clear();
    b->mutable_data()->swap(slot);
  }
}

void RestoreBlocks(google::protobuf::RepeatedPtrField<tessera::v1::TensorBlock>* blocks,
                   std::vector<std::string>* parked) {
  for (int i = 0; i < blocks->size() && i < static_cast<int>(parked->size()); ++i) {
    // Only what OffloadBlocks moved: blocks the sender wrote into the area
    // itself keep their range.
    if ((*parked)[i].empty()) continue;
    tessera::v1::TensorBlock* b = blocks->Mutable(i);
    b->mutable_data()->swap((*parked)[i]);
    (*parked)[i].clear();
    b->clear_shm_offset();
    b->clear_shm_size();
  }
}

absl::StatusOr<absl::string_view> BlockPayload(const tessera::v1::TensorBlock& block,
                                               absl::Span<const char> area) {
  if (block.shm_size() == 0) {
    if (block.shm_offset() != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "block ", block.block_id(), " has a shared-memory offset but no size"));
    }
    return absl::string_view(block.data());
  }
  if (area.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "block ", block.block_id(), " refers to shared memory, but this stream has none"));
  }
  if (!block.data().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "block ", block.block_id(), " has both inline data and a shared-memory range"));
  }
  const uint64_t off = block.shm_offset(), len = block.shm_size();
  if (off > area.size() || len > area.size() - off) {
    return absl::InvalidArgumentError(absl::StrCat(
        "block ", block.block_id(), ": shared-memory range [", off, ", +", len,
        ") leaves the ", area.size(), "-byte area"));
  }
  return absl::string_view(area.data() + off, len);
}

absl::Status ResolvePayloads(
    const google::protobuf::RepeatedPtrField<tessera::v1::TensorBlock>& blocks,
    absl::Span<const char> area, std::vector<absl::string_view>* out) {
  out->clear();
  for (const tessera::v1::TensorBlock& b : blocks) {
    absl::StatusOr<absl::string_view> p = BlockPayload(b, area);
    if (!p.ok()) return p.status();
    out->push_back(*p);
  }
  return absl::OkStatus();
}

absl::Status MaterializeBlocks(
    google::protobuf::RepeatedPtrField<tessera::v1::TensorBlock>* blocks,
    absl::Span<const char> area) {
  // Check every block first, so that an error changes nothing.
  for (const tessera::v1::TensorBlock& b : *blocks) {
    absl::StatusOr<absl::string_view> p = BlockPayload(b, area);
    if (!p.ok()) return p.status();
  }
  for (tessera::v1::TensorBlock& b : *blocks) {
    if (b.shm_size() == 0) continue;
    b.mutable_data()->assign(area.data() + b.shm_offset(), b.shm_size());
    b.clear_shm_offset();
    b.clear_shm_size();
  }
  return absl::OkStatus();
}

void EncodeToShared(tessera::v1::DType dtype, absl::Span<const float> values,
                    absl::Span<char> out) {
#if defined(__AVX2__)
  const size_t bytes = values.size() * sizeof(float);
  if (dtype == tessera::v1::F32 && reinterpret_cast<uintptr_t>(out.data()) % 32 == 0 &&
      out.size() == bytes) {
    const char* src = reinterpret_cast<const char*>(values.data());
    size_t i = 0;
    for (; i + 32 <= bytes; i += 32) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(out.data() + i),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    }
    if (i < bytes) std::memcpy(out.data() + i, src + i, bytes - i);
    _mm_sfence();  // the stores are visible before the message that names them
    return;
  }
#endif
  EncodeTo(dtype, values, out);
}

void EncodeBlockPayload(tessera::v1::DType dtype, absl::Span<const float> values,
                        absl::Span<char> area, uint64_t* used,
                        tessera::v1::TensorBlock* block) {
  const uint64_t bytes = values.size() * DTypeSize(dtype);
  if (PayloadFits(*used, bytes, area.size())) {
    EncodeToShared(dtype, values, area.subspan(*used, bytes));
    block->clear_data();
    block->set_shm_offset(*used);
    block->set_shm_size(bytes);
    *used = NextPayloadOffset(*used, bytes, area.size());
  } else {
    block->clear_shm_offset();
    block->clear_shm_size();
    Encode(dtype, values, block->mutable_data());
  }
}

bool IsLocalTarget(absl::string_view address) {
  if (absl::StartsWith(address, "unix:") || absl::StartsWith(address, "unix-abstract:")) {
    return true;
  }
  absl::ConsumePrefix(&address, "dns:///");
  absl::ConsumePrefix(&address, "ipv4:");
  absl::ConsumePrefix(&address, "ipv6:");
  return absl::StartsWith(address, "127.") || absl::StartsWith(address, "localhost:") ||
         address == "localhost" || absl::StartsWith(address, "[::1]");
}

bool IsLocalPeer(absl::string_view peer) {
  return absl::StartsWith(peer, "unix:") || absl::StartsWith(peer, "unix-abstract:") ||
         absl::StartsWith(peer, "ipv4:127.") || absl::StartsWith(peer, "ipv6:[::1]") ||
         absl::StartsWith(peer, "ipv6:%5B::1%5D");
}

}  // namespace tessera
