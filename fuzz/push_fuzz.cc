// Fuzzes what the Session handler (server/parameter_service.cc) does with
// the messages on a stream: each ClientMessage is parsed from the wire bytes,
// offered to the worker's PushPartGatherer (pushes in parts are gathered
// until their last part), and dispatched to a ShardStore as the handler
// does (Hello -> Connect,
// push -> Push, then Pull of step + 1 when it asks for parameters, pull ->
// Pull; pulls here with a zero timeout), plus stream ends (Disconnect).
//
// Input: byte 0 picks the job (bit 0: SYNC or ASYNC; both linear:8-2,
// 16-byte blocks, two workers, shard 0 of two, Adam). Then up to 64 records:
//   [ctl] [len] [len bytes: a serialized tessera.v1.ClientMessage]
// ctl bits 0-1: worker id - 1 (so -1..2; only 0 and 1 exist), bits 2-3: the
// incarnation, bits 6-7 == 3: a Disconnect instead (no len, no bytes; it
// also ends that worker's stream, so a push half sent in parts is dropped).
// A store is made per input, so every crash replays from its input alone.
//
// Invariants: no crash or sanitizer report; a rejected push (or one
// acknowledged without effect) leaves the parameters exactly as they were
// and a rejection is counted once; the parameters stay finite; a pull
// returns every owned block whole, at the store's version, with the same
// numbers the store holds; live workers stay within [0, num_workers].

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/protocol.h"
#include "common/shared_region.h"
#include "fuzz/fuzz_util.h"
#include "proto/tessera.pb.h"
#include "server/push_parts.h"
#include "server/shard_store.h"

namespace tessera::fuzz {
namespace {

constexpr int kNumWorkers = 2;
constexpr int kShard = 0;
constexpr int kMaxRecords = 64;

double PulledSum(const tessera::v1::PullResult& pull) {
  double sum = 0;
  for (const tessera::v1::TensorBlock& b : pull.blocks()) {
    for (size_t i = 0; i + 4 <= b.data().size(); i += 4) {
      float v;
      std::memcpy(&v, b.data().data() + i, 4);
      sum += v;
    }
  }
  return sum;
}

class Session {
 public:
  explicit Session(tessera::v1::ConsistencyMode mode) {
    absl::StatusOr<std::unique_ptr<ShardStore>> store =
        ShardStore::Create(SmallJob(mode, kNumWorkers), kShard);
    if (!store.ok()) Fail(std::string(store.status().message()));
    store_ = *std::move(store);
    const auto& owned = store_->partition().shard_blocks(kShard);
    owned_blocks_ = static_cast<int>(owned.size());
    for (uint32_t id : owned) {
      owned_elements_ += store_->partition().blocks()[id].num_elements;
    }
  }

  int owned_blocks() const { return owned_blocks_; }
  int64_t shard_bytes() const { return store_->partition().shard_bytes(kShard); }

  void Connect(int worker, int64_t incarnation) {
    store_->Connect(worker, incarnation).IgnoreError();
    CheckState("connect");
  }

  void Disconnect(int worker, int64_t incarnation) {
    store_->Disconnect(worker, incarnation);
    CheckState("disconnect");
  }

  // Returns whether the push was accepted.
  bool Push(int worker, int64_t incarnation, const tessera::v1::PushRequest& push,
            absl::Span<const absl::string_view> payloads) {
    const double before = store_->ParamSum();
    const int64_t rejected_before = store_->stats().requests_rejected;
    absl::StatusOr<PushOutcome> outcome = store_->Push(worker, incarnation, push, payloads);
    const double after = store_->ParamSum();
    const int64_t rejected_after = store_->stats().requests_rejected;
    if (!outcome.ok()) {
      const absl::StatusCode code = outcome.status().code();
      Check(code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kNotFound ||
                code == absl::StatusCode::kFailedPrecondition,
            absl::StrCat("push rejected with an unexpected status: ",
                         outcome.status().ToString()));
      Check(after == before, absl::StrCat("rejected push changed the parameters: sum ", before,
                                          " -> ", after, " (", outcome.status().ToString(), ")"));
      Check(rejected_after == rejected_before + 1,
            absl::StrCat("rejected push counted ", rejected_after - rejected_before,
                         " times (", outcome.status().ToString(), ")"));
    } else {
      Check(rejected_after == rejected_before, "accepted push counted as rejected");
      if (!outcome->applied) {
        Check(after == before, absl::StrCat("push acknowledged without effect changed the "
                                            "parameters: sum ",
                                            before, " -> ", after, " (", outcome->detail, ")"));
      }
    }
    CheckState("push");
    return outcome.ok();
  }

  void Pull(int64_t step) {
    tessera::v1::PullResult pull;
    absl::Status s = store_->Pull(step, absl::ZeroDuration(), &pull);
    if (s.ok()) {
      Check(pull.blocks_size() == owned_blocks_,
            absl::StrCat("pull returned ", pull.blocks_size(), " blocks, shard owns ",
                         owned_blocks_));
      int64_t elements = 0;
      for (const tessera::v1::TensorBlock& b : pull.blocks()) {
        Check(b.dtype() == tessera::v1::F32, "pulled block is not F32");
        Check(b.block_id() < store_->partition().blocks().size() &&
                  store_->partition().blocks()[b.block_id()].shard == kShard,
              absl::StrCat("pulled block ", b.block_id(), " is not this shard's"));
        const int64_t n = store_->partition().blocks()[b.block_id()].num_elements;
        Check(static_cast<int64_t>(b.data().size()) == n * 4,
              absl::StrCat("pulled block ", b.block_id(), " has ", b.data().size(), " bytes"));
        elements += n;
      }
      Check(elements == owned_elements_, "pulled blocks do not cover the shard");
      Check(pull.version() == store_->stats().version,
            absl::StrCat("pull version ", pull.version(), " but the store is at ",
                         store_->stats().version));
      Check(PulledSum(pull) == store_->ParamSum(), "pulled numbers differ from the store's");
    } else {
      Check(s.code() == absl::StatusCode::kUnavailable,
            absl::StrCat("pull failed with an unexpected status: ", s.ToString()));
    }
    CheckState("pull");
  }

  void Finish() {
    // Nothing is in flight on a single thread, so this must not wait.
    ShardState snapshot = store_->Snapshot();
    Check(static_cast<int>(snapshot.blocks.size()) == owned_blocks_,
          "snapshot lacks blocks");
    for (const BlockState& b : snapshot.blocks) {
      for (float v : b.params) Check(std::isfinite(v), "snapshot holds a non-finite parameter");
    }
  }

 private:
  void CheckState(const char* after) {
    const double sum = store_->ParamSum();
    Check(std::isfinite(sum), absl::StrCat("parameters not finite after ", after, ": sum ", sum));
    const StoreStats s = store_->stats();
    Check(s.live_workers >= 0 && s.live_workers <= kNumWorkers,
          absl::StrCat("live_workers ", s.live_workers, " after ", after));
    Check(s.version >= last_version_,
          absl::StrCat("version went back from ", last_version_, " to ", s.version));
    last_version_ = s.version;
  }

  std::unique_ptr<ShardStore> store_;
  int owned_blocks_ = 0;
  int64_t owned_elements_ = 0;
  int64_t last_version_ = 0;
};

}  // namespace
}  // namespace tessera::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using tessera::fuzz::Session;
  if (size < 1) return 0;
  Session session((data[0] & 1) ? tessera::v1::ASYNC : tessera::v1::SYNC);
  size_t pos = 1;
  tessera::v1::ClientMessage read;
  std::vector<absl::string_view> payloads;
  // One stream per worker id (-1..2), with the handler's limits.
  auto new_gatherer = [&session] {
    return std::make_unique<tessera::PushPartGatherer>(session.owned_blocks(),
                                                       2 * session.shard_bytes() + (1 << 20));
  };
  std::unique_ptr<tessera::PushPartGatherer> gatherers[4];
  for (auto& g : gatherers) g = new_gatherer();
  for (int record = 0; record < tessera::fuzz::kMaxRecords && pos < size; ++record) {
    const uint8_t ctl = data[pos++];
    const int worker = static_cast<int>(ctl & 3) - 1;
    const int64_t incarnation = (ctl >> 2) & 3;
    if ((ctl >> 6) == 3) {
      session.Disconnect(worker, incarnation);
      gatherers[worker + 1] = new_gatherer();
      continue;
    }
    if (pos >= size) break;
    size_t len = data[pos++];
    if (len > size - pos) len = size - pos;
    const bool parsed = read.ParseFromArray(data + pos, static_cast<int>(len));
    pos += len;
    if (!parsed) continue;  // gRPC fails the stream's Read on such bytes
    const tessera::v1::ClientMessage* handle = nullptr;
    absl::Status refused;
    const tessera::PushPartGatherer::Action action =
        gatherers[worker + 1]->Offer(&read, &handle, &refused);
    if (action == tessera::PushPartGatherer::Action::kRefuse) {
      tessera::fuzz::Check(refused.code() == absl::StatusCode::kInvalidArgument,
                           "a refused part with another status than INVALID_ARGUMENT");
    }
    // A part gathered or dropped, or a refused one: nothing reaches the store.
    if (action != tessera::PushPartGatherer::Action::kHandle) continue;
    tessera::fuzz::Check(!handle->push().more_parts(),
                         "a push handled while it says more parts follow");
    const tessera::v1::ClientMessage& message = *handle;
    // As the Session handler does: a push's payloads are resolved, inline or
    // in the stream's shared-memory region (here a fixed buffer), and the
    // store reads them through the views.
    static char region[4096];
    if (message.has_push() &&
        !tessera::ResolvePayloads(message.push().blocks(),
                                  absl::Span<const char>(region, (ctl & 0x20) ? sizeof(region) : 0),
                                  &payloads)
             .ok()) {
      continue;  // answered with INVALID_ARGUMENT, nothing reaches the store
    }
    switch (tessera::KindOf(message)) {
      case tessera::RequestKind::kHello:
        session.Connect(message.hello().worker_id(), message.hello().incarnation());
        break;
      case tessera::RequestKind::kPush:
        // A fused push-pull asks for step + 1 when the push was accepted.
        if (session.Push(worker, incarnation, message.push(), payloads) &&
            message.push().return_parameters()) {
          int64_t next;
          tessera::fuzz::Check(!__builtin_add_overflow(message.push().step(), 1, &next),
                               "accepted push for the largest step: the Session handler's "
                               "step + 1 overflows (server/parameter_service.cc)");
          session.Pull(next);
        }
        break;
      case tessera::RequestKind::kPull:
        session.Pull(message.pull().step());
        break;
      default:
        break;  // answered with INVALID_ARGUMENT, nothing reaches the store
    }
  }
  session.Finish();
  return 0;
}
