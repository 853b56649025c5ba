// Fuzzes the Hello path of a Session (ShardStore::Connect with the worker id
// and incarnation a Hello names) and the stream's end (Disconnect), mixed
// with well-formed pushes and pulls that move the barrier, against a model
// of the membership rules:
//   Connect(w, i): kInvalidArgument unless 0 <= w < num_workers;
//                  kFailedPrecondition when i is older than w's incarnation;
//                  otherwise w adopts i (a newer one starts with no open
//                  streams), opens one more stream and is live.
//   Disconnect(w, i): when i is w's current incarnation, one of its streams
//                  ends; w leaves the barrier when the last one has.
//   Push(w, i) (valid): the same id and incarnation rules as Connect (a
//                  push opens no stream), after which w is live whatever
//                  the step.
// SYNC runs with 0, 1 or 2 backup workers (a step closes with the first
// num_workers - backup_workers gradients): the gradients taken into the open
// step are counted from the outcomes (applied without the version moving:
// one more; the version moving: the step closed, or a fast-forward opened a
// new one with this push in it), and a step holding that many must have
// closed. Only SYNC reports late pushes.
// Invariants: every status matches the model, live_workers equals the
// model's count (so always within [0, num_workers]), the version never goes
// back, an open step holds fewer gradients than close it, parameters stay
// finite, and a snapshot at the end does not wait.

#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/tensor_codec.h"
#include "fuzz/fuzz_util.h"
#include "server/shard_store.h"

namespace tessera::fuzz {
namespace {

constexpr int kNumWorkers = 3;
constexpr int kShard = 0;
constexpr int kMaxOps = 256;

struct ModelWorker {
  int64_t incarnation = 0;
  int streams = 0;
  bool live = true;  // a store starts with every worker counted
};

int WorkerId(FuzzedDataProvider& in) {
  if (in.ConsumeBool()) return in.ConsumeIntegral<int32_t>();
  return in.ConsumeIntegralInRange<int>(-1, kNumWorkers);
}

int64_t Incarnation(FuzzedDataProvider& in) {
  if (in.ConsumeBool()) return in.ConsumeIntegral<int64_t>();
  return in.ConsumeIntegralInRange<int64_t>(-1, 4);
}

// A well-formed push of `value` for every block the shard owns.
tessera::v1::PushRequest FullPush(const ShardStore& store, int64_t step, float value) {
  tessera::v1::PushRequest push;
  push.set_step(step);
  for (uint32_t id : store.partition().shard_blocks(kShard)) {
    tessera::v1::TensorBlock* b = push.add_blocks();
    b->set_block_id(id);
    b->set_dtype(tessera::v1::F32);
    std::vector<float> values(store.partition().blocks()[id].num_elements, value);
    EncodeF32(values, b->mutable_data());
  }
  return push;
}

void Run(FuzzedDataProvider& in) {
  const tessera::v1::ConsistencyMode mode =
      in.PickValueInArray({tessera::v1::SYNC, tessera::v1::ASYNC, tessera::v1::SSP});
  tessera::v1::JobSpec job = SmallJob(mode, kNumWorkers);
  const int backup =
      mode == tessera::v1::SYNC ? in.ConsumeIntegralInRange<int>(0, kNumWorkers - 1) : 0;
  job.mutable_consistency()->set_backup_workers(backup);
  const int quorum = kNumWorkers - backup;
  int open_step_gradients = 0;  // SYNC: taken into the step in progress
  absl::StatusOr<std::unique_ptr<ShardStore>> created = ShardStore::Create(job, kShard);
  if (!created.ok()) Fail(std::string(created.status().message()));
  ShardStore& store = **created;
  std::vector<ModelWorker> model(kNumWorkers);
  int64_t last_version = 0;

  for (int op = 0; op < kMaxOps && in.remaining_bytes() > 0; ++op) {
    const int kind = in.ConsumeIntegralInRange<int>(0, 3);
    const int worker = WorkerId(in);
    const int64_t incarnation = Incarnation(in);
    const bool in_range = worker >= 0 && worker < kNumWorkers;
    std::string what;
    switch (kind) {
      case 0: {  // Hello
        what = absl::StrCat("Connect(", worker, ", ", incarnation, ")");
        const absl::Status s = store.Connect(worker, incarnation);
        absl::StatusCode want = absl::StatusCode::kOk;
        if (!in_range) {
          want = absl::StatusCode::kInvalidArgument;
        } else if (incarnation < model[worker].incarnation) {
          want = absl::StatusCode::kFailedPrecondition;
        } else {
          ModelWorker& w = model[worker];
          if (incarnation > w.incarnation) w = {incarnation, 0, true};
          ++w.streams;
          w.live = true;
        }
        Check(s.code() == want, absl::StrCat(what, " returned ", s.ToString()));
        break;
      }
      case 1: {  // the stream ends
        what = absl::StrCat("Disconnect(", worker, ", ", incarnation, ")");
        const int64_t version_before = store.stats().version;
        store.Disconnect(worker, incarnation);
        if (store.stats().version != version_before) open_step_gradients = 0;
        if (in_range && model[worker].incarnation == incarnation) {
          ModelWorker& w = model[worker];
          w.streams = std::max(0, w.streams - 1);
          if (w.streams == 0) w.live = false;
        }
        break;
      }
      case 2: {  // a well-formed push
        const int64_t step = in.ConsumeIntegralInRange<int64_t>(0, 6);
        what = absl::StrCat("Push(", worker, ", ", incarnation, ", step ", step, ")");
        const double before = store.ParamSum();
        const int64_t version_before = store.stats().version;
        const absl::StatusOr<PushOutcome> r =
            store.Push(worker, incarnation, FullPush(store, step, 0.25f));
        if (!in_range) {
          Check(r.status().code() == absl::StatusCode::kInvalidArgument,
                absl::StrCat(what, " returned ", r.status().ToString()));
        } else if (incarnation < model[worker].incarnation) {
          Check(r.status().code() == absl::StatusCode::kFailedPrecondition,
                absl::StrCat(what, " returned ", r.status().ToString()));
        } else {
          ModelWorker& w = model[worker];
          if (incarnation > w.incarnation) w.incarnation = incarnation;
          w.live = true;
          // SYNC refuses pushes ahead of the step; anything else is taken.
          Check(r.ok() || r.status().code() == absl::StatusCode::kFailedPrecondition,
                absl::StrCat(what, " returned ", r.status().ToString()));
        }
        if (!r.ok()) {
          Check(store.ParamSum() == before, absl::StrCat(what, " was refused but changed the "
                                                         "parameters"));
        } else {
          Check(!r->late || (mode == tessera::v1::SYNC && !r->applied),
                absl::StrCat(what, " was late in ", tessera::v1::ConsistencyMode_Name(mode),
                             " or late and applied"));
          const int64_t moved = store.stats().version - version_before;
          if (mode == tessera::v1::SYNC && r->applied) {
            if (moved == 0) {
              ++open_step_gradients;
            } else if (r->fast_forwarded > 0 && moved == r->fast_forwarded) {
              open_step_gradients = 1;  // the first gradient of the step it jumped to
            } else {
              open_step_gradients = 0;  // this push closed the step
            }
          }
        }
        break;
      }
      default: {  // a pull that does not wait
        const int64_t step = in.ConsumeIntegralInRange<int64_t>(0, 6);
        what = absl::StrCat("Pull(", step, ")");
        tessera::v1::PullResult out;
        const absl::Status s = store.Pull(step, absl::ZeroDuration(), &out);
        Check(s.ok() || s.code() == absl::StatusCode::kUnavailable,
              absl::StrCat(what, " returned ", s.ToString()));
        break;
      }
    }
    const StoreStats stats = store.stats();
    int live = 0;
    for (const ModelWorker& w : model) live += w.live ? 1 : 0;
    Check(stats.live_workers >= 0 && stats.live_workers <= kNumWorkers,
          absl::StrCat("live_workers ", stats.live_workers, " after ", what));
    Check(stats.live_workers == live, absl::StrCat("live_workers ", stats.live_workers,
                                                   ", expected ", live, " after ", what));
    Check(stats.version >= last_version,
          absl::StrCat("version went back from ", last_version, " to ", stats.version));
    Check(open_step_gradients < quorum,
          absl::StrCat("the open step holds ", open_step_gradients, " gradients but ", quorum,
                       " close it (", backup, " backup workers) after ", what));
    Check(mode == tessera::v1::SYNC || stats.pushes_late == 0,
          absl::StrCat(stats.pushes_late, " late pushes in ",
                       tessera::v1::ConsistencyMode_Name(mode)));
    last_version = stats.version;
    Check(std::isfinite(store.ParamSum()), absl::StrCat("parameters not finite after ", what));
  }
  // Nothing is in flight on a single thread, so this must not wait.
  const ShardState snapshot = store.Snapshot();
  Check(snapshot.blocks.size() == store.partition().shard_blocks(kShard).size(),
        "snapshot lacks blocks");
}

}  // namespace
}  // namespace tessera::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  tessera::fuzz::Run(in);
  return 0;
}
