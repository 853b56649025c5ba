#include "server/shard_store.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>

#include "Eigen/Core"
#include "absl/strings/str_cat.h"
#include "common/shared_region.h"
#include "common/status_macros.h"
#include "common/tensor_codec.h"

namespace tessera {
namespace {

using tessera::v1::PushRequest;

// Payload bytes of block i: its `data`, or the caller's view of them.
absl::string_view PayloadOf(const PushRequest& request,
                            absl::Span<const absl::string_view> payloads, int i) {
  return payloads.empty() ? absl::string_view(request.blocks(i).data()) : payloads[i];
}

// Payload of a validated F32 block. The wire format is the in-memory
// format (little-endian), so gradients are read in place, never copied.
const float* PayloadFloats(absl::string_view payload) {
  return reinterpret_cast<const float*>(payload.data());
}

// Payload bytes of each block of a push, for ShardStore::ForEachBlock.
auto PayloadSizes(const PushRequest& request, absl::Span<const absl::string_view> payloads) {
  return [&request, payloads](int i) {
    return static_cast<int64_t>(PayloadOf(request, payloads, i).size());
  };
}

// Optimizer slots per block at most (Adam has two); checked by Create.
constexpr int kMaxSlots = 4;

using ConstArrayMap = Eigen::Map<const Eigen::ArrayXf, Eigen::Unaligned>;
using ArrayMap = Eigen::Map<Eigen::ArrayXf, Eigen::Unaligned>;

}  // namespace

absl::StatusOr<std::unique_ptr<ShardStore>> ShardStore::Create(
    const tessera::v1::JobSpec& job, int shard) {
  if (shard < 0 || shard >= job.num_shards()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shard ", shard, " out of range for job.num_shards = ", job.num_shards()));
  }
  LossKind loss = job.loss() == tessera::v1::SOFTMAX_CROSS_ENTROPY
                      ? LossKind::kSoftmaxCrossEntropy
                      : LossKind::kMeanSquaredError;
  TESSERA_ASSIGN_OR_RETURN(ModelSpec model, ParseModelSpec(job.model(), loss));
  TESSERA_ASSIGN_OR_RETURN(
      Partition partition,
      Partition::Create(model, job.num_shards(), job.block_bytes()));
  absl::StatusOr<std::unique_ptr<Optimizer>> optimizer =
      Optimizer::Create(job.optimizer());
  if (!optimizer.ok()) return Annotate(optimizer.status(), "job");
  if ((*optimizer)->num_slots() > kMaxSlots) {
    return absl::InternalError(absl::StrCat("optimizer with ", (*optimizer)->num_slots(),
                                            " slots per block; the store takes ", kMaxSlots));
  }
  std::unique_ptr<ShardStore> store(
      new ShardStore(job, shard, std::move(partition), *std::move(optimizer)));
  // Initial values depend only on (seed, parameter, element), so every shard
  // count starts from the same model.
  for (Block* b : store->owned_) {
    absl::MutexLock lock(&b->mu);
    const ParamSpec& p = model.params[b->info.param_index];
    InitParameter(p, b->info.param_index, job.seed(), b->info.param_offset,
                  b->info.param_offset + b->info.num_elements, b->params.data());
  }
  return store;
}

ShardStore::ShardStore(const tessera::v1::JobSpec& job, int shard, Partition partition,
                       std::unique_ptr<Optimizer> optimizer)
    : job_(job),
      shard_(shard),
      mode_(job.consistency().mode()),
      wire_dtype_(IsWireDType(job.wire_dtype()) ? job.wire_dtype() : tessera::v1::F32),
      quorum_(std::max(1, job.num_workers() - std::max(0, job.consistency().backup_workers()))),
      partition_(std::move(partition)),
      optimizer_(std::move(optimizer)),
      workers_(job.num_workers()) {
  blocks_.resize(partition_.blocks().size());
  for (uint32_t id : partition_.shard_blocks(shard)) {
    auto block = std::make_unique<Block>();
    block->info = partition_.blocks()[id];
    const size_t n = block->info.num_elements;
    absl::MutexLock lock(&block->mu);
    block->params = AlignedBuffer(n);
    for (int k = 0; k < optimizer_->num_slots(); ++k) {
      block->slots.emplace_back(n, optimizer_->SlotInitialValue(k));
    }
    if (mode_ == tessera::v1::SYNC) block->accum = AlignedBuffer(n);
    owned_.push_back(block.get());
    blocks_[id] = std::move(block);
  }
}

absl::Status ShardStore::Validate(const PushRequest& request,
                                  absl::Span<const absl::string_view> payloads,
                                  bool* nonfinite) const {
  *nonfinite = false;
  // Steps count from 0 and stay far from overflow (step + 1 is taken).
  constexpr int64_t kMaxStep = int64_t{1} << 53;
  if (request.step() < 0 || request.step() >= kMaxStep) {
    return absl::InvalidArgumentError(
        absl::StrCat("push step ", request.step(), " outside [0, 2^53)"));
  }
  if (request.blocks_size() != static_cast<int>(owned_.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("push carries ", request.blocks_size(), " blocks; shard ",
                     shard_, " owns ", owned_.size(), " and takes all of them"));
  }
  if (!payloads.empty() && payloads.size() != static_cast<size_t>(request.blocks_size())) {
    return absl::InternalError("payload views do not match the push's blocks");
  }
  // Each owned block exactly once; ids are dense so a bitmap suffices.
  std::vector<bool> seen(blocks_.size(), false);
  // Values each block carries, for the finiteness pass below.
  std::vector<int64_t> values_of(request.blocks_size());
  for (int i = 0; i < request.blocks_size(); ++i) {
    const tessera::v1::TensorBlock& tb = request.blocks(i);
    const absl::string_view data = PayloadOf(request, payloads, i);
    const uint32_t id = tb.block_id();
    if (id >= blocks_.size() || blocks_[id] == nullptr) {
      return absl::NotFoundError(
          absl::StrCat("block ", id, " is not owned by shard ", shard_));
    }
    if (seen[id]) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", id, " appears twice in one push"));
    }
    seen[id] = true;
    if (!IsWireDType(tb.dtype())) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", id, ": unsupported dtype ",
                       tessera::v1::DType_Name(tb.dtype()), ", expected F32, BF16 or F16"));
    }
    const int64_t n = blocks_[id]->info.num_elements;
    const int64_t width = DTypeSize(tb.dtype());
    int64_t values = n;
    if (tb.sparse()) {
      absl::Status sparse = ValidateSparse(tb.dtype(), tb.indices(), data, n);
      if (!sparse.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("block ", id, ": ", sparse.message()));
      }
      values = static_cast<int64_t>(tb.indices().size() / 4);
    } else if (static_cast<int64_t>(data.size()) != n * width) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", id, ": payload has ", data.size(),
                       " bytes, expected ", n * width));
    } else if (!tb.indices().empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", id, ": indices on a dense block (set sparse)"));
    }
    values_of[i] = values;
  }
  // Finiteness reads every payload byte: the one pass that costs, so it
  // runs on the apply threads. The first bad block in push order is named.
  std::vector<char> bad(request.blocks_size(), 0);
  ForEachBlock(request.blocks_size(), PayloadSizes(request, payloads), [&](int i) {
    const tessera::v1::TensorBlock& tb = request.blocks(i);
    bad[i] = !PayloadWithinGradientLimit(tb.dtype(), PayloadOf(request, payloads, i), values_of[i]);
  });
  for (int i = 0; i < request.blocks_size(); ++i) {
    if (bad[i]) {
      *nonfinite = true;
      return absl::InvalidArgumentError(absl::StrCat(
          "block ", request.blocks(i).block_id(),
          ": gradient has NaN or infinite values, or values of magnitude >= 2^101"));
    }
  }
  return absl::OkStatus();
}

void ShardStore::SetApplyThreads(int threads) {
  pool_ = threads > 1 ? std::make_unique<ApplyPool>(threads) : nullptr;
}

std::function<int64_t(int)> ShardStore::OwnedSizes() const {
  return [this](int i) { return owned_[i]->info.num_elements * int64_t{sizeof(float)}; };
}

void ShardStore::ForEachBlock(int n, absl::FunctionRef<int64_t(int)> bytes_of,
                              absl::FunctionRef<void(int)> fn) const {
  // The largest block bounds how far threads can shorten the work; they
  // pay off when the others hold enough besides it.
  int64_t total = 0;
  int64_t largest = 0;
  if (pool_ != nullptr) {
    for (int i = 0; i < n; ++i) {
      const int64_t b = bytes_of(i);
      total += b;
      largest = std::max(largest, b);
    }
  }
  if (pool_ != nullptr && total - largest >= kParallelBytes) {
    pool_->Run(n, fn);
  } else {
    for (int i = 0; i < n; ++i) fn(i);
  }
}

absl::Status ShardStore::Connect(int worker, int64_t incarnation) {
  absl::MutexLock lock(&mu_);
  if (worker < 0 || worker >= static_cast<int>(workers_.size())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "worker id ", worker, " out of range [0, ", workers_.size(), ")"));
  }
  WorkerState& w = workers_[worker];
  if (incarnation < w.incarnation) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", worker, " incarnation ", incarnation,
                     " is older than the current ", w.incarnation));
  }
  if (incarnation > w.incarnation) {
    w.incarnation = incarnation;
    w.last_step = -1;
    w.streams = 0;
  }
  ++w.streams;
  w.live = true;
  return absl::OkStatus();
}

void ShardStore::Disconnect(int worker, int64_t incarnation) {
  bool apply = false;
  int contributors = 0;
  int64_t step = 0;
  {
    absl::MutexLock lock(&mu_);
    if (worker < 0 || worker >= static_cast<int>(workers_.size())) return;
    WorkerState& w = workers_[worker];
    if (w.incarnation != incarnation) return;  // a newer incarnation took over
    // A worker that reconnected (same incarnation) before its old stream's
    // end was noticed is still here: only its last stream's end counts.
    w.streams = std::max(0, w.streams - 1);
    if (w.streams > 0) return;
    if (mode_ == tessera::v1::SYNC && departure_grace_ > absl::ZeroDuration()) {
      // The end of a stream the worker already gave up on (after a server
      // freeze, say) can be handled just before the new stream's Hello:
      // give the worker a moment to come back before the step goes on
      // without it. mu_ is released while waiting.
      auto back = [this, worker, incarnation]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        const WorkerState& v = workers_[worker];
        return shutdown_ || v.incarnation != incarnation || v.streams > 0;
      };
      mu_.AwaitWithTimeout(absl::Condition(&back), departure_grace_);
      if (w.incarnation != incarnation || w.streams > 0) return;
    }
    w.live = false;
    // Streams also end because this server is stopping; then no step may
    // complete short-handed: the final checkpoint holds whole steps only.
    if (mode_ == tessera::v1::SYNC && !shutdown_ && StepCompleteLocked()) {
      apply = true;
      applying_ = true;
      contributors = static_cast<int>(contributed_.size());
      step = step_;
    }
  }
  if (apply) CompleteStep(contributors, step);
}

bool ShardStore::StepCompleteLocked() const {
  if (applying_ || accumulating_ > 0 || contributed_.empty()) return false;
  if (static_cast<int>(contributed_.size()) >= quorum_) return true;  // backup workers
  for (int i = 0; i < static_cast<int>(workers_.size()); ++i) {
    if (workers_[i].live && !contributed_.contains(i)) return false;
  }
  return true;
}

int64_t ShardStore::WorkerClock(int worker) const {
  absl::MutexLock lock(&mu_);
  if (mode_ == tessera::v1::SYNC || worker < 0 || worker >= static_cast<int>(workers_.size())) {
    return 0;
  }
  return workers_[worker].clock;
}

void ShardStore::SetDepartureGrace(absl::Duration grace) {
  absl::MutexLock lock(&mu_);
  departure_grace_ = grace;
}

void ShardStore::CountRejected() {
  absl::MutexLock lock(&mu_);
  ++counters_.requests_rejected;
}

absl::StatusOr<PushOutcome> ShardStore::Push(int worker, int64_t incarnation,
                                             const PushRequest& request,
                                             absl::Span<const absl::string_view> payloads) {
  bool nonfinite = false;
  absl::Status valid = Validate(request, payloads, &nonfinite);
  if (!valid.ok()) {
    absl::MutexLock lock(&mu_);
    ++counters_.requests_rejected;
    if (nonfinite) ++counters_.nonfinite_rejected;
    return valid;
  }
  const int64_t step = request.step();
  int64_t staleness = 0;
  int64_t fast_forwarded = 0;
  {
    absl::MutexLock lock(&mu_);
    if (shutdown_) {
      return absl::UnavailableError(absl::StrCat("shard ", shard_, " is shutting down"));
    }
    if (worker < 0 || worker >= static_cast<int>(workers_.size())) {
      ++counters_.requests_rejected;
      return absl::InvalidArgumentError(absl::StrCat(
          "worker id ", worker, " out of range [0, ", workers_.size(), ")"));
    }
    WorkerState& w = workers_[worker];
    if (incarnation < w.incarnation) {
      ++counters_.requests_rejected;
      return absl::FailedPreconditionError(
          absl::StrCat("push from worker ", worker, " incarnation ", incarnation,
                       ", which was replaced by incarnation ", w.incarnation));
    }
    if (incarnation > w.incarnation) {
      w.incarnation = incarnation;
      w.last_step = -1;
    }
    w.live = true;
    if (mode_ == tessera::v1::SYNC && recovering_ && step > step_) {
      // About to jump (below): let a step being summed or applied finish.
      auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return !applying_ && accumulating_ == 0;
      };
      mu_.Await(absl::Condition(&idle));
    }
    if (step <= w.last_step) {
      ++counters_.pushes_duplicate;
      return PushOutcome{false, absl::StrCat("duplicate push for step ", step)};
    }
    if (mode_ == tessera::v1::SYNC) {
      if (step < step_ || (step == step_ && applying_)) {
        w.last_step = step;
        ++counters_.pushes_late;
        return PushOutcome{.detail = absl::StrCat("step ", step, " is closed"), .late = true};
      }
      // A worker pushes step s only after this shard returned parameters of
      // step s, so a push ahead of step_ means the shard lost steps that
      // its workers saw complete: it restarted from an older checkpoint.
      // Until its first step completes it jumps to the workers' step,
      // counting the skipped steps as lost. The partial sums of the open
      // step go too: that step had completed before the restart (the
      // worker pushing ahead saw it), and waiting for pushes that will not
      // come again would hang its contributors.
      // (The wait above left no step being summed or applied.)
      if (step > step_ && recovering_) {
        if (!contributed_.empty()) {
          for (Block* b : owned_) {
            absl::MutexLock block_lock(&b->mu);
            std::fill(b->accum.data(), b->accum.data() + b->accum.size(), 0.0f);
          }
          contributed_.clear();
        }
        fast_forwarded = step - step_;
        counters_.lost_steps += fast_forwarded;
        version_ += fast_forwarded;
        step_ = step;
      }
      if (step > step_) {
        ++counters_.requests_rejected;
        return absl::FailedPreconditionError(
            absl::StrCat("push for step ", step, " but shard ", shard_,
                         " is at step ", step_, "; pull first"));
      }
      if (contributed_.contains(worker)) {
        // An earlier incarnation gave this step its gradient before it was
        // restarted: a step takes one gradient per worker.
        w.last_step = step;
        ++counters_.pushes_duplicate;
        return PushOutcome{.detail =
                               absl::StrCat("step ", step, " already holds a gradient of worker ",
                                            worker, " (from an earlier incarnation)")};
      }
      if (static_cast<int>(contributed_.size()) >= quorum_) {
        // Backup workers: the step already has its gradients and is being
        // summed; this one is dropped as if it had come after the apply.
        w.last_step = step;
        ++counters_.pushes_late;
        return PushOutcome{.detail = absl::StrCat("step ", step, " already has the ", quorum_,
                                                  " gradients it applies"),
                           .late = true};
      }
      contributed_.insert(worker);
      ++accumulating_;
    }
    w.last_step = step;
    staleness = mode_ == tessera::v1::SYNC
                    ? 0
                    : version_ - std::clamp<int64_t>(request.base_version(), 0, version_);
  }

  if (mode_ != tessera::v1::SYNC) {
    ApplyDirect(request, payloads);
    bool checkpoint = false;
    int64_t version;
    {
      absl::MutexLock lock(&mu_);
      ++counters_.pushes_applied;
      version = ++version_;
      WorkerState& w = workers_[worker];
      w.clock = std::max(w.clock, step + 1);
      checkpoint = checkpoint_hook_ && (checkpoint_pending_ ||
                                        (checkpoint_every_ > 0 && version % checkpoint_every_ == 0));
      checkpoint_pending_ = false;
    }
    // Asynchronous checkpoints are per-block consistent, as async training is.
    if (checkpoint) checkpoint_hook_(CopyBlocks(version, version));
    return PushOutcome{true, "", staleness};
  }

  ForEachBlock(request.blocks_size(), PayloadSizes(request, payloads), [&](int i) {
    const tessera::v1::TensorBlock& tb = request.blocks(i);
    const absl::string_view data = PayloadOf(request, payloads, i);
    Block* b = blocks_[tb.block_id()].get();
    absl::MutexLock lock(&b->mu);
    if (tb.sparse()) {
      ScatterAddInto(tb.dtype(), tb.indices(), data, b->accum.data());
    } else {
      AccumulateInto(tb.dtype(), data, b->accum.data(), b->info.num_elements);
    }
  });
  bool apply = false;
  int contributors = 0;
  {
    absl::MutexLock lock(&mu_);
    --accumulating_;
    ++counters_.pushes_applied;
    if (StepCompleteLocked()) {
      apply = true;
      applying_ = true;
      contributors = static_cast<int>(contributed_.size());
    }
  }
  if (apply) CompleteStep(contributors, step);
  return PushOutcome{true, "", staleness, fast_forwarded};
}

void ShardStore::ApplyStep(int contributors, int64_t step) {
  const float lr = static_cast<float>(optimizer_->LearningRate(step));
  const float scale = 1.0f / static_cast<float>(contributors);
  ForEachBlock(static_cast<int>(owned_.size()), OwnedSizes(), [&](int i) {
    Block* b = owned_[i];
    absl::MutexLock lock(&b->mu);
    const int64_t n = b->info.num_elements;
    ArrayMap accum(b->accum.data(), n);
    accum *= scale;
    ApplyToBlockLocked(b, lr, b->accum.data());
    accum.setZero();
  });
}

void ShardStore::CompleteStep(int contributors, int64_t step) {
  ApplyStep(contributors, step);
  bool checkpoint;
  {
    absl::MutexLock lock(&mu_);
    checkpoint = checkpoint_hook_ && (checkpoint_pending_ || (checkpoint_every_ > 0 &&
                                                              (step + 1) % checkpoint_every_ == 0));
    checkpoint_pending_ = false;
  }
  // While applying_ is set no pull for the next step is answered, so no
  // push for it can arrive: the copy holds exactly step + 1 updates.
  std::optional<ShardState> snapshot;
  if (checkpoint) snapshot = CopyBlocks(step + 1, step + 1);
  {
    absl::MutexLock lock(&mu_);
    ++step_;
    ++version_;
    contributed_.clear();
    applying_ = false;
    recovering_ = false;
  }
  if (snapshot) checkpoint_hook_(*std::move(snapshot));
}

ShardState ShardStore::CopyBlocks(int64_t step, int64_t version) {
  ShardState state;
  state.step = step;
  state.version = version;
  for (Block* b : owned_) {
    absl::MutexLock lock(&b->mu);
    BlockState bs;
    bs.info = b->info;
    bs.params.assign(b->params.data(), b->params.data() + b->params.size());
    for (const AlignedBuffer& slot : b->slots) {
      bs.slots.emplace_back(slot.data(), slot.data() + slot.size());
    }
    bs.updates = b->updates;
    state.blocks.push_back(std::move(bs));
  }
  return state;
}

ShardState ShardStore::Snapshot() {
  absl::MutexLock lock(&mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !applying_ && accumulating_ == 0;
  };
  mu_.Await(absl::Condition(&idle));
  // Holding mu_ keeps any new step from starting; block locks nest inside
  // mu_ here and nowhere the other way round.
  return CopyBlocks(mode_ == tessera::v1::SYNC ? step_ : version_, version_);
}

void ShardStore::Restore(const RestoredModel& model) {
  for (Block* b : owned_) {
    absl::MutexLock lock(&b->mu);
    const int64_t at = b->info.flat_offset, n = b->info.num_elements;
    std::copy(model.params.begin() + at, model.params.begin() + at + n, b->params.data());
    for (size_t k = 0; k < b->slots.size(); ++k) {
      std::copy(model.slots[k].begin() + at, model.slots[k].begin() + at + n, b->slots[k].data());
    }
    b->updates = *std::max_element(model.updates.begin() + at, model.updates.begin() + at + n);
  }
  absl::MutexLock lock(&mu_);
  step_ = mode_ == tessera::v1::SYNC ? model.step : 0;
  version_ = model.version;
}

void ShardStore::SetCheckpointHook(int64_t every_steps, std::function<void(ShardState)> hook) {
  checkpoint_every_ = every_steps;
  checkpoint_hook_ = std::move(hook);
}

void ShardStore::RequestCheckpoint() {
  bool now = false;
  {
    absl::MutexLock lock(&mu_);
    if (!checkpoint_hook_) return;
    bool in_flight = false;
    for (const WorkerState& w : workers_) in_flight |= w.live;
    in_flight &= mode_ == tessera::v1::SYNC && (!contributed_.empty() || applying_);
    if (in_flight) {
      checkpoint_pending_ = true;
    } else {
      now = true;
    }
  }
  if (now) checkpoint_hook_(Snapshot());
}

void ShardStore::ApplyDirect(const PushRequest& request,
                             absl::Span<const absl::string_view> payloads) {
  // Asynchronous modes schedule the learning rate by the pushing worker's
  // own step, so the schedule does not depend on arrival order.
  const float lr = static_cast<float>(optimizer_->LearningRate(request.step()));
  ForEachBlock(request.blocks_size(), PayloadSizes(request, payloads), [&](int i) {
    const tessera::v1::TensorBlock& tb = request.blocks(i);
    const absl::string_view data = PayloadOf(request, payloads, i);
    Block* b = blocks_[tb.block_id()].get();
    absl::MutexLock lock(&b->mu);
    const float* grad = PayloadFloats(data);
    if (tb.sparse()) {
      // Sparse gradients are densified (zeros elsewhere) into the block's
      // scratch buffer, so every optimizer sees the same dense update.
      if (b->scratch.size() == 0) b->scratch = AlignedBuffer(b->info.num_elements);
      std::fill(b->scratch.data(), b->scratch.data() + b->info.num_elements, 0.0f);
      ScatterAddInto(tb.dtype(), tb.indices(), data, b->scratch.data());
      grad = b->scratch.data();
    } else if (tb.dtype() != tessera::v1::F32) {
      // Compressed gradients are widened into the block's scratch buffer;
      // the optimizer always works in F32.
      if (b->scratch.size() == 0) b->scratch = AlignedBuffer(b->info.num_elements);
      DecodeF32(tb.dtype(), data, b->scratch.span()).IgnoreError();  // validated
      grad = b->scratch.data();
    }
    ApplyToBlockLocked(b, lr, grad);
  });
}

void ShardStore::ApplyToBlockLocked(Block* b, float lr, const float* grad) const {
  float* slots[kMaxSlots];
  for (size_t k = 0; k < b->slots.size(); ++k) slots[k] = b->slots[k].data();
  ++b->updates;
  optimizer_->Apply(b->updates, lr, b->params.data(), grad, slots, b->info.num_elements);
}

int64_t ShardStore::SlowestClockLocked() const {
  int64_t slowest = std::numeric_limits<int64_t>::max();
  for (const WorkerState& w : workers_) {
    if (w.live) slowest = std::min(slowest, w.clock);
  }
  return slowest;
}

bool ShardStore::PullReadyLocked(int64_t step) const {
  if (shutdown_) return true;
  switch (mode_) {
    case tessera::v1::SYNC:
      return step_ >= step && !applying_;
    case tessera::v1::SSP:
      return SlowestClockLocked() >= step - job_.consistency().staleness();
    default:
      return true;
  }
}

absl::Status ShardStore::Pull(int64_t step, absl::Duration timeout,
                              tessera::v1::PullResult* out, absl::Span<char> area) {
  int64_t version;
  {
    absl::MutexLock lock(&mu_);
    auto ready = [this, step]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return PullReadyLocked(step);
    };
    if (!mu_.AwaitWithTimeout(absl::Condition(&ready), timeout)) {
      return absl::UnavailableError(absl::StrCat(
          "shard ", shard_, ": timed out after ", absl::FormatDuration(timeout),
          " waiting for step ", step, " (shard is at step ", step_,
          "); a worker may be missing"));
    }
    if (shutdown_) {
      return absl::UnavailableError(
          absl::StrCat("shard ", shard_, " is shutting down"));
    }
    version = mode_ == tessera::v1::SYNC ? step_ : version_;
  }
  out->set_version(version);
  // Reuse the message's block storage across pulls: no allocation once warm.
  while (out->blocks_size() > static_cast<int>(owned_.size())) {
    out->mutable_blocks()->RemoveLast();
  }
  // Where each block goes in the area depends on the sizes alone, so the
  // blocks can be encoded in any order (on the apply threads when large).
  // (The caller's own vector, named by reference: a helper thread would
  // see its own thread_local one.)
  thread_local std::vector<uint64_t> offsets_storage;
  std::vector<uint64_t>& offsets = offsets_storage;
  offsets.resize(owned_.size());
  uint64_t area_used = 0;
  for (size_t i = 0; i < owned_.size(); ++i) {
    Block* b = owned_[i];
    if (static_cast<int>(i) == out->blocks_size()) out->add_blocks();
    tessera::v1::TensorBlock* tb = out->mutable_blocks(static_cast<int>(i));
    tb->set_block_id(b->info.id);
    tb->set_dtype(wire_dtype_);
    offsets[i] = area_used;
    area_used = NextPayloadOffset(
        area_used, static_cast<uint64_t>(b->info.num_elements) * DTypeSize(wire_dtype_),
        area.size());
  }
  ForEachBlock(static_cast<int>(owned_.size()), OwnedSizes(), [&](int i) {
    Block* b = owned_[i];
    uint64_t used = offsets[i];
    absl::MutexLock lock(&b->mu);
    EncodeBlockPayload(wire_dtype_, b->params.span(), area, &used, out->mutable_blocks(i));
  });
  return absl::OkStatus();
}

void ShardStore::Shutdown() {
  absl::MutexLock lock(&mu_);
  shutdown_ = true;
}

StoreStats ShardStore::stats() const {
  absl::MutexLock lock(&mu_);
  StoreStats s = counters_;
  s.version = mode_ == tessera::v1::SYNC ? step_ : version_;
  s.live_workers = 0;
  for (const WorkerState& w : workers_) s.live_workers += w.live ? 1 : 0;
  return s;
}

double ShardStore::ParamSum() const {
  double sum = 0;
  for (Block* b : owned_) {
    absl::MutexLock lock(&b->mu);
    for (float v : b->params.span()) sum += v;
  }
  return sum;
}

}  // namespace tessera
