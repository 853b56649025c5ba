#include "server/shard_store.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>

#include "absl/functional/function_ref.h"
#include "absl/strings/str_cat.h"
#include "common/job_spec.h"
#include "common/shared_region.h"
#include "common/tensor_codec.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

using tessera::v1::JobSpec;
using tessera::v1::PushRequest;

// linear:4-2 has 8 weights + 2 biases. With 16-byte blocks the weight splits
// into two blocks of 4 and the bias is one block of 2.
JobSpec ExactSumJob(tessera::v1::ConsistencyMode mode, int workers, int shards = 1) {
  JobSpec job;
  job.set_name("exact-sum");
  job.set_model("linear:4-2");
  job.set_loss(tessera::v1::MEAN_SQUARED_ERROR);
  job.mutable_data()->set_format(tessera::v1::SYNTHETIC_REGRESSION);
  job.mutable_data()->set_num_samples(10);
  job.mutable_data()->set_validation_fraction(0.2);
  job.mutable_optimizer()->set_type(tessera::v1::SGD);
  job.mutable_optimizer()->set_learning_rate(1.0);
  job.mutable_consistency()->set_mode(mode);
  job.mutable_consistency()->set_staleness(1);
  job.mutable_consistency()->set_barrier_timeout_ms(2000);
  job.set_batch_size(1);
  job.set_epochs(1);
  job.set_num_shards(shards);
  job.set_num_workers(workers);
  job.set_block_bytes(16);
  EXPECT_TRUE(ValidateJobSpec(&job).ok());
  return job;
}

// A dense F32 push for every block the store owns, with value(id, k) as
// element k of block `id`.
PushRequest DensePush(const ShardStore& store, int64_t step,
                      absl::FunctionRef<float(uint32_t id, int64_t k)> value) {
  PushRequest push;
  push.set_step(step);
  for (uint32_t id : store.partition().shard_blocks(store.shard())) {
    const BlockInfo& b = store.partition().blocks()[id];
    std::vector<float> v(b.num_elements);
    for (int64_t k = 0; k < b.num_elements; ++k) v[k] = value(id, k);
    tessera::v1::TensorBlock* tb = push.add_blocks();
    tb->set_block_id(id);
    tb->set_dtype(tessera::v1::F32);
    EncodeF32(v, tb->mutable_data());
  }
  return push;
}

// A push of `value` in every element of every block the store owns.
PushRequest FullPush(const ShardStore& store, int64_t step, float value) {
  return DensePush(store, step, [value](uint32_t, int64_t) { return value; });
}

std::vector<float> AllParams(ShardStore& store) {
  tessera::v1::PullResult pull;
  EXPECT_TRUE(store.Pull(0, absl::ZeroDuration(), &pull).ok());
  std::vector<float> out(store.partition().total_elements());
  for (const auto& tb : pull.blocks()) {
    const BlockInfo& b = store.partition().blocks()[tb.block_id()];
    EXPECT_TRUE(DecodeF32(tb.dtype(), tb.data(),
                          absl::MakeSpan(out).subspan(b.flat_offset, b.num_elements))
                    .ok());
  }
  return out;
}

// Parameters after SGD with learning rate 1 subtracted `delta` from each.
void ExpectShifted(const std::vector<float>& before, const std::vector<float>& after,
                   float delta) {
  ASSERT_EQ(before.size(), after.size());
  for (size_t i = 0; i < before.size(); ++i) {
    EXPECT_EQ(after[i], before[i] - delta) << "element " << i;
  }
}

TEST(ShardStoreTest, InitialParametersDoNotDependOnShardCount) {
  JobSpec one = ExactSumJob(tessera::v1::ASYNC, 1, 1);
  JobSpec three = ExactSumJob(tessera::v1::ASYNC, 1, 3);
  auto whole = ShardStore::Create(one, 0);
  ASSERT_TRUE(whole.ok());
  std::vector<float> expected = AllParams(**whole);
  std::vector<float> assembled(expected.size(), 0.0f);
  for (int s = 0; s < 3; ++s) {
    auto part = ShardStore::Create(three, s);
    ASSERT_TRUE(part.ok());
    std::vector<float> p = AllParams(**part);  // zeros where not owned
    for (size_t i = 0; i < p.size(); ++i) assembled[i] += p[i];
  }
  EXPECT_EQ(assembled, expected);
  EXPECT_NE(expected[0], expected[1]);
}

TEST(ShardStoreTest, ReplayedPushIsAppliedOnce) {
  for (auto mode : {tessera::v1::ASYNC, tessera::v1::SYNC, tessera::v1::SSP}) {
    SCOPED_TRACE(ModeName(mode));
    auto store = ShardStore::Create(ExactSumJob(mode, 1), 0);
    ASSERT_TRUE(store.ok());
    ASSERT_TRUE((*store)->Connect(0, 1).ok());
    const std::vector<float> before = AllParams(**store);
    const PushRequest push = FullPush(**store, 0, 1.0f);
    int applied = 0;
    for (int i = 0; i < 10; ++i) {
      auto outcome = (*store)->Push(0, 1, push);
      ASSERT_TRUE(outcome.ok()) << outcome.status();
      applied += outcome->applied ? 1 : 0;
    }
    EXPECT_EQ(applied, 1);
    // SGD with lr 1 and an all-ones gradient subtracts exactly 1 per element.
    ExpectShifted(before, AllParams(**store), 1.0f);
    EXPECT_EQ((*store)->stats().pushes_applied, 1);
    EXPECT_EQ((*store)->stats().pushes_duplicate, 9);
  }
}

TEST(ShardStoreTest, ConcurrentDuplicatesApplyOnce) {
  auto store = ShardStore::Create(ExactSumJob(tessera::v1::ASYNC, 1), 0);
  ASSERT_TRUE(store.ok());
  const std::vector<float> before = AllParams(**store);
  const PushRequest push = FullPush(**store, 5, 1.0f);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] { ASSERT_TRUE((*store)->Push(0, 1, push).ok()); });
  }
  for (auto& t : threads) t.join();
  ExpectShifted(before, AllParams(**store), 1.0f);
}

TEST(ShardStoreTest, SyncStepAppliesMeanOfAllWorkers) {
  auto store = ShardStore::Create(ExactSumJob(tessera::v1::SYNC, 2), 0);
  ASSERT_TRUE(store.ok());
  const std::vector<float> before = AllParams(**store);
  ASSERT_TRUE((*store)->Push(0, 1, FullPush(**store, 0, 1.0f)).ok());
  // One of two workers: the step stays open, parameters unchanged.
  EXPECT_EQ((*store)->stats().version, 0);
  EXPECT_EQ(AllParams(**store), before);
  tessera::v1::PullResult pull;
  EXPECT_EQ((*store)->Pull(1, absl::Milliseconds(50), &pull).code(),
            absl::StatusCode::kUnavailable);
  ASSERT_TRUE((*store)->Push(1, 1, FullPush(**store, 0, 3.0f)).ok());
  EXPECT_EQ((*store)->stats().version, 1);
  const std::vector<float> after = AllParams(**store);
  for (size_t i = 0; i < after.size(); ++i) EXPECT_FLOAT_EQ(after[i], before[i] - 2.0f);
  EXPECT_TRUE((*store)->Pull(1, absl::ZeroDuration(), &pull).ok());
  EXPECT_EQ(pull.version(), 1);
}

TEST(ShardStoreTest, SyncPullWaitsForTheStep) {
  auto store = ShardStore::Create(ExactSumJob(tessera::v1::SYNC, 2), 0);
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->Push(0, 1, FullPush(**store, 0, 1.0f)).ok());
  absl::Status waited;
  std::thread puller([&] {
    tessera::v1::PullResult pull;
    waited = (*store)->Pull(1, absl::Seconds(10), &pull);
  });
  absl::SleepFor(absl::Milliseconds(50));
  ASSERT_TRUE((*store)->Push(1, 1, FullPush(**store, 0, 1.0f)).ok());
  puller.join();
  EXPECT_TRUE(waited.ok()) << waited;
}

TEST(ShardStoreTest, DepartedWorkerLeavesTheBarrier) {
  auto store = ShardStore::Create(ExactSumJob(tessera::v1::SYNC, 2), 0);
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->Connect(0, 1).ok());
  ASSERT_TRUE((*store)->Connect(1, 1).ok());
  const std::vector<float> before = AllParams(**store);
  ASSERT_TRUE((*store)->Push(0, 1, FullPush(**store, 0, 2.0f)).ok());
  (*store)->Disconnect(1, 1);  // worker 1 dies mid-step
  EXPECT_EQ((*store)->stats().version, 1);
  EXPECT_EQ((*store)->stats().live_workers, 1);
  ExpectShifted(before, AllParams(**store), 2.0f);  // the mean of one gradient
  const std::vector<float> after_first = AllParams(**store);
  // The next step needs only the live worker.
  ASSERT_TRUE((*store)->Push(0, 1, FullPush(**store, 1, 1.0f)).ok());
  EXPECT_EQ((*store)->stats().version, 2);
  // A late push for a closed step is acknowledged and not applied.
  auto late = (*store)->Push(1, 1, FullPush(**store, 0, 100.0f));
  ASSERT_TRUE(late.ok());
  EXPECT_FALSE(late->applied);
  EXPECT_TRUE(late->late);
  ExpectShifted(after_first, AllParams(**store), 1.0f);
  EXPECT_EQ((*store)->stats().pushes_late, 1);
  EXPECT_EQ((*store)->stats().pushes_duplicate, 0);
}

// A worker restarted in the middle of a synchronous step (new incarnation)
// computes the same step again: its first incarnation's gradient is already
// in the step's sum, so the second is acknowledged without effect and the
// step still averages one gradient per worker.
TEST(ShardStoreTest, RestartedWorkerDoesNotAddASecondGradientToTheOpenStep) {
  auto store = ShardStore::Create(ExactSumJob(tessera::v1::SYNC, 2), 0);
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->Connect(0, 1).ok());
  ASSERT_TRUE((*store)->Connect(1, 1).ok());
  const std::vector<float> before = AllParams(**store);
  ASSERT_TRUE((*store)->Push(0, 1, FullPush(**store, 0, 1.0f)).ok());
  (*store)->Disconnect(0, 1);  // killed; worker 1 has not pushed yet
  EXPECT_EQ((*store)->stats().version, 0);
  ASSERT_TRUE((*store)->Connect(0, 2).ok());
  auto again = (*store)->Push(0, 2, FullPush(**store, 0, 1.0f));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(again->applied);
  EXPECT_FALSE(again->late);
  ASSERT_TRUE((*store)->Push(1, 1, FullPush(**store, 0, 3.0f)).ok());
  EXPECT_EQ((*store)->stats().version, 1);
  ExpectShifted(before, AllParams(**store), 2.0f);  // (1 + 3) / 2, not (1 + 1 + 3) / 2
  EXPECT_EQ((*store)->stats().pushes_applied, 2);
  EXPECT_EQ((*store)->stats().pushes_duplicate, 1);
  // The new incarnation takes part in the next step.
  ASSERT_TRUE((*store)->Push(0, 2, FullPush(**store, 1, 1.0f)).ok());
  ASSERT_TRUE((*store)->Push(1, 1, FullPush(**store, 1, 1.0f)).ok());
  EXPECT_EQ((*store)->stats().version, 2);
}

// Backup workers (3 workers, 1 backup): a step applies the mean of the
// first two gradients; the third is acknowledged without effect and counted
// as late, and its resend as a duplicate.
TEST(ShardStoreTest, BackupWorkersCloseAStepWithTheFirstGradients) {
  JobSpec job = ExactSumJob(tessera::v1::SYNC, 3);
  job.mutable_consistency()->set_backup_workers(1);
  ASSERT_TRUE(ValidateJobSpec(&job).ok());
  auto store = ShardStore::Create(job, 0);
  ASSERT_TRUE(store.ok());
  for (int w = 0; w < 3; ++w) ASSERT_TRUE((*store)->Connect(w, 1).ok());
  const std::vector<float> before = AllParams(**store);
  ASSERT_TRUE((*store)->Push(0, 1, FullPush(**store, 0, 1.0f)).ok());
  EXPECT_EQ((*store)->stats().version, 0);  // one of the two it needs
  auto second = (*store)->Push(2, 1, FullPush(**store, 0, 3.0f));
  ASSERT_TRUE(second.ok());
  EXPECT_TRUE(second->applied);
  EXPECT_EQ((*store)->stats().version, 1);
  ExpectShifted(before, AllParams(**store), 2.0f);  // (1 + 3) / 2
  tessera::v1::PullResult pull;
  EXPECT_TRUE((*store)->Pull(1, absl::ZeroDuration(), &pull).ok());

  const std::vector<float> after_first = AllParams(**store);
  auto straggler = (*store)->Push(1, 1, FullPush(**store, 0, 100.0f));
  ASSERT_TRUE(straggler.ok());
  EXPECT_FALSE(straggler->applied);
  EXPECT_TRUE(straggler->late);
  auto resend = (*store)->Push(1, 1, FullPush(**store, 0, 100.0f));
  ASSERT_TRUE(resend.ok());
  EXPECT_FALSE(resend->applied);
  EXPECT_FALSE(resend->late);
  EXPECT_EQ(AllParams(**store), after_first);
  StoreStats stats = (*store)->stats();
  EXPECT_EQ(stats.pushes_applied, 2);
  EXPECT_EQ(stats.pushes_late, 1);
  EXPECT_EQ(stats.pushes_duplicate, 1);

  // The straggler takes part in the next step like anyone else.
  ASSERT_TRUE((*store)->Push(1, 1, FullPush(**store, 1, 5.0f)).ok());
  ASSERT_TRUE((*store)->Push(0, 1, FullPush(**store, 1, 7.0f)).ok());
  EXPECT_EQ((*store)->stats().version, 2);
  ExpectShifted(after_first, AllParams(**store), 6.0f);

  // With fewer live workers than the quorum, every live one closes a step.
  (*store)->Disconnect(1, 1);
  (*store)->Disconnect(2, 1);
  const std::vector<float> after_second = AllParams(**store);
  ASSERT_TRUE((*store)->Push(0, 1, FullPush(**store, 2, 4.0f)).ok());
  EXPECT_EQ((*store)->stats().version, 3);
  ExpectShifted(after_second, AllParams(**store), 4.0f);
}

// Pushes racing for the last place of a step: each step takes exactly the
// quorum's gradients, never one more, however the pushes interleave.
TEST(ShardStoreTest, BackupWorkersTakeExactlyTheQuorumUnderConcurrency) {
  constexpr int kWorkers = 4;
  constexpr int kSteps = 200;
  JobSpec job = ExactSumJob(tessera::v1::SYNC, kWorkers);
  job.mutable_consistency()->set_backup_workers(2);
  ASSERT_TRUE(ValidateJobSpec(&job).ok());
  auto store = ShardStore::Create(job, 0);
  ASSERT_TRUE(store.ok());
  for (int w = 0; w < kWorkers; ++w) ASSERT_TRUE((*store)->Connect(w, 1).ok());
  const std::vector<float> before = AllParams(**store);
  std::atomic<int> late{0};
  std::vector<std::thread> workers;
  for (int w = 0; w < kWorkers; ++w) {
    workers.emplace_back([&, w] {
      for (int64_t step = 0; step < kSteps; ++step) {
        tessera::v1::PullResult pull;
        ASSERT_TRUE((*store)->Pull(step, absl::Seconds(30), &pull).ok());
        // A worker whose push came late continues from the newer step.
        if (pull.version() > step) step = pull.version();
        if (step >= kSteps) break;
        auto outcome = (*store)->Push(w, 1, FullPush(**store, step, 1.0f));
        ASSERT_TRUE(outcome.ok()) << outcome.status();
        if (outcome->late) late.fetch_add(1);
      }
    });
  }
  for (std::thread& t : workers) t.join();
  const StoreStats stats = (*store)->stats();
  EXPECT_EQ(stats.version, kSteps);
  EXPECT_EQ(stats.pushes_applied, 2 * kSteps);
  EXPECT_EQ(stats.pushes_late, late.load());
  EXPECT_EQ(stats.pushes_duplicate, 0);
  // Each step lowers every parameter by the mean gradient, exactly 1.
  std::vector<float> expected = before;
  for (int step = 0; step < kSteps; ++step) {
    for (float& v : expected) v -= 1.0f;
  }
  EXPECT_EQ(AllParams(**store), expected);
}

// The end of a stream the worker already abandoned, handled just before its
// new stream's Hello (a server resumed after a freeze): with a departure
// grace the worker stays in the barrier; without one it would be dropped
// and the step would close without its gradient.
TEST(ShardStoreTest, DepartureGraceKeepsAWorkerThatReconnects) {
  auto store = ShardStore::Create(ExactSumJob(tessera::v1::SYNC, 2), 0);
  ASSERT_TRUE(store.ok());
  (*store)->SetDepartureGrace(absl::Seconds(30));
  ASSERT_TRUE((*store)->Connect(0, 1).ok());
  ASSERT_TRUE((*store)->Connect(1, 1).ok());
  ASSERT_TRUE((*store)->Push(0, 1, FullPush(**store, 0, 2.0f)).ok());
  std::thread reconnect([&] {
    absl::SleepFor(absl::Milliseconds(200));
    ASSERT_TRUE((*store)->Connect(1, 1).ok());
  });
  const absl::Time start = absl::Now();
  (*store)->Disconnect(1, 1);  // returns when the new stream is open
  reconnect.join();
  EXPECT_LT(absl::Now() - start, absl::Seconds(20));  // not the whole grace
  EXPECT_EQ((*store)->stats().live_workers, 2);
  EXPECT_EQ((*store)->stats().version, 0);  // still waiting for worker 1
  ASSERT_TRUE((*store)->Push(1, 1, FullPush(**store, 0, 4.0f)).ok());
  EXPECT_EQ((*store)->stats().version, 1);
  EXPECT_EQ((*store)->stats().pushes_applied, 2);
  // A worker that does not come back leaves once the grace is over.
  (*store)->SetDepartureGrace(absl::Milliseconds(100));
  (*store)->Disconnect(1, 1);
  EXPECT_EQ((*store)->stats().live_workers, 1);
}

TEST(ShardStoreTest, WorkerClockSurvivesANewIncarnation) {
  auto store = ShardStore::Create(ExactSumJob(tessera::v1::ASYNC, 2), 0);
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->Connect(1, 1).ok());
  for (int step = 0; step < 5; ++step) {
    ASSERT_TRUE((*store)->Push(1, 1, FullPush(**store, step, 1.0f)).ok());
  }
  EXPECT_EQ((*store)->WorkerClock(1), 5);
  EXPECT_EQ((*store)->WorkerClock(0), 0);
  (*store)->Disconnect(1, 1);
  ASSERT_TRUE((*store)->Connect(1, 2).ok());  // restarted
  EXPECT_EQ((*store)->WorkerClock(1), 5);
  EXPECT_EQ((*store)->WorkerClock(7), 0);  // unknown worker
  auto sync = ShardStore::Create(ExactSumJob(tessera::v1::SYNC, 1), 0);
  ASSERT_TRUE(sync.ok());
  ASSERT_TRUE((*sync)->Push(0, 1, FullPush(**sync, 0, 1.0f)).ok());
  EXPECT_EQ((*sync)->WorkerClock(0), 0);  // SYNC resumes from the step instead
}

TEST(ShardStoreTest, LateEndOfAReplacedStreamDoesNotDropTheWorker) {
  auto store = ShardStore::Create(ExactSumJob(tessera::v1::SYNC, 2), 0);
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->Connect(0, 1).ok());
  ASSERT_TRUE((*store)->Connect(1, 1).ok());
  // Worker 1 reconnects on a new stream; the old stream's end is noticed
  // only afterwards.
  ASSERT_TRUE((*store)->Connect(1, 1).ok());
  (*store)->Disconnect(1, 1);
  EXPECT_EQ((*store)->stats().live_workers, 2);
  // So a push from worker 0 alone does not complete the step.
  ASSERT_TRUE((*store)->Push(0, 1, FullPush(**store, 0, 1.0f)).ok());
  EXPECT_EQ((*store)->stats().version, 0);
  (*store)->Disconnect(1, 1);  // now its last stream ends
  EXPECT_EQ((*store)->stats().live_workers, 1);
  EXPECT_EQ((*store)->stats().version, 1);
}

TEST(ShardStoreTest, StaleIncarnationIsRejected) {
  auto store = ShardStore::Create(ExactSumJob(tessera::v1::ASYNC, 1), 0);
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->Connect(0, 5).ok());
  EXPECT_EQ((*store)->Connect(0, 4).code(), absl::StatusCode::kFailedPrecondition);
  const double before = (*store)->ParamSum();
  EXPECT_EQ((*store)->Push(0, 4, FullPush(**store, 0, 1.0f)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_DOUBLE_EQ((*store)->ParamSum(), before);
  // The new incarnation starts its steps afresh.
  auto ok = (*store)->Push(0, 6, FullPush(**store, 0, 1.0f));
  ASSERT_TRUE(ok.ok());
  EXPECT_TRUE(ok->applied);
}

TEST(ShardStoreTest, BadPushesChangeNothingAndAreCounted) {
  auto store = ShardStore::Create(ExactSumJob(tessera::v1::ASYNC, 1, 2), 0);
  ASSERT_TRUE(store.ok());
  const std::vector<float> before = AllParams(**store);
  const PushRequest good = FullPush(**store, 0, 1.0f);

  PushRequest wrong_size = good;
  wrong_size.mutable_blocks(0)->mutable_data()->resize(4);
  PushRequest unknown = good;
  unknown.mutable_blocks(0)->set_block_id(999);
  PushRequest other_shard = good;
  uint32_t foreign = 0;
  while ((*store)->partition().blocks()[foreign].shard == 0) ++foreign;
  other_shard.mutable_blocks(0)->set_block_id(foreign);
  PushRequest wrong_dtype = good;
  wrong_dtype.mutable_blocks(0)->set_dtype(tessera::v1::F16);
  PushRequest missing_block = good;
  missing_block.mutable_blocks()->RemoveLast();
  PushRequest duplicate_block = good;
  *duplicate_block.mutable_blocks(duplicate_block.blocks_size() - 1) = good.blocks(0);
  PushRequest negative_step = good;
  negative_step.set_step(-1);

  struct Case {
    const char* name;
    const PushRequest* push;
    absl::StatusCode code;
  };
  const Case cases[] = {
      {"wrong size", &wrong_size, absl::StatusCode::kInvalidArgument},
      {"unknown block", &unknown, absl::StatusCode::kNotFound},
      {"block of another shard", &other_shard, absl::StatusCode::kNotFound},
      {"wrong dtype", &wrong_dtype, absl::StatusCode::kInvalidArgument},
      {"missing block", &missing_block, absl::StatusCode::kInvalidArgument},
      {"duplicate block", &duplicate_block, absl::StatusCode::kInvalidArgument},
      {"negative step", &negative_step, absl::StatusCode::kInvalidArgument},
  };
  int rejected = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    EXPECT_EQ((*store)->Push(0, 1, *c.push).status().code(), c.code);
    EXPECT_EQ((*store)->stats().requests_rejected, ++rejected);
    EXPECT_EQ(AllParams(**store), before);
  }
  const float bad_values[] = {std::numeric_limits<float>::quiet_NaN(),
                              std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity()};
  for (float bad : bad_values) {
    PushRequest poisoned = good;
    std::string* data = poisoned.mutable_blocks(1)->mutable_data();
    std::memcpy(data->data() + data->size() - 4, &bad, 4);  // last element only
    auto s = (*store)->Push(0, 1, poisoned);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.status().message().find("NaN or infinite"), std::string::npos);
    EXPECT_EQ(AllParams(**store), before);
  }
  EXPECT_EQ((*store)->stats().nonfinite_rejected, 3);
  EXPECT_EQ((*store)->stats().requests_rejected, rejected + 3);
  // The next good request succeeds.
  auto ok = (*store)->Push(0, 1, good);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_TRUE(ok->applied);
  EXPECT_NE(AllParams(**store), before);
}

TEST(ShardStoreTest, OverflowSizedGradientsAreRejectedAndParametersStayFinite) {
  for (auto mode : {tessera::v1::SYNC, tessera::v1::ASYNC}) {
    SCOPED_TRACE(ModeName(mode));
    // Two workers and SGD with learning rate 1: summing two 1e38 gradients
    // would overflow F32 if they were let in.
    auto store = ShardStore::Create(ExactSumJob(mode, 2), 0);
    ASSERT_TRUE(store.ok());
    const std::vector<float> before = AllParams(**store);
    for (int step = 0; step < 5; ++step) {
      for (int worker = 0; worker < 2; ++worker) {
        auto r = (*store)->Push(worker, 1, FullPush(**store, step, 1e38f));
        EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
      }
    }
    EXPECT_EQ(AllParams(**store), before);
    EXPECT_EQ((*store)->stats().nonfinite_rejected, 10);
    // Large but bounded gradients are applied and keep every parameter finite.
    for (int worker = 0; worker < 2; ++worker) {
      ASSERT_TRUE((*store)->Push(worker, 1, FullPush(**store, 0, 1e30f)).ok());
    }
    for (float v : AllParams(**store)) EXPECT_TRUE(std::isfinite(v));
    // And steps near the top of int64 are refused rather than overflowed.
    EXPECT_EQ((*store)->Push(0, 1, FullPush(**store, INT64_MAX, 1.0f)).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
}

TEST(ShardStoreTest, SyncRejectsPushesAheadOfTheStep) {
  auto store = ShardStore::Create(ExactSumJob(tessera::v1::SYNC, 1), 0);
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->Push(0, 1, FullPush(**store, 0, 1.0f)).ok());
  const double before = (*store)->ParamSum();
  EXPECT_EQ((*store)->Push(0, 1, FullPush(**store, 3, 1.0f)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_DOUBLE_EQ((*store)->ParamSum(), before);
  EXPECT_EQ((*store)->stats().lost_steps, 0);
}

TEST(ShardStoreTest, FreshShardFastForwardsToItsWorkers) {
  // A shard restarted from an old checkpoint while its workers kept going:
  // the first push names a later step, and the shard jumps to it, counting
  // the skipped steps as lost.
  auto store = ShardStore::Create(ExactSumJob(tessera::v1::SYNC, 2), 0);
  ASSERT_TRUE(store.ok());
  const std::vector<float> before = AllParams(**store);
  auto first = (*store)->Push(0, 1, FullPush(**store, 7, 1.0f));
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->fast_forwarded, 7);
  EXPECT_EQ((*store)->stats().lost_steps, 7);
  ASSERT_TRUE((*store)->Push(1, 1, FullPush(**store, 7, 3.0f)).ok());
  EXPECT_EQ((*store)->stats().version, 8);
  ExpectShifted(before, AllParams(**store), 2.0f);  // step 7 applied once, as a mean
  // No longer fresh: a push far ahead is refused again.
  EXPECT_EQ((*store)->Push(0, 1, FullPush(**store, 20, 1.0f)).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(ShardStoreTest, RecoveringShardDropsAnOpenStepThatItsWorkersSawComplete) {
  // A shard restarted from a checkpoint at step 10 while its workers were
  // at step 14: the old shard completed step 14 and worker 1 received it,
  // but the reply to worker 0 was lost, so worker 0 resends step 14 and the
  // fresh shard jumps there. Worker 1 then pushes step 15. The shard must
  // drop the open step 14 (worker 1 will never push it again) and jump to
  // step 15 rather than refuse worker 1 and leave both waiting for ever.
  auto store = ShardStore::Create(ExactSumJob(tessera::v1::SYNC, 2), 0);
  ASSERT_TRUE(store.ok());
  const std::vector<float> before = AllParams(**store);
  auto resent = (*store)->Push(0, 1, FullPush(**store, 14, 1.0f));
  ASSERT_TRUE(resent.ok()) << resent.status();
  EXPECT_EQ(resent->fast_forwarded, 14);
  // Worker 0 waits for step 15's parameters meanwhile.
  absl::Status waited;
  tessera::v1::PullResult pulled;
  std::thread waiter([&] { waited = (*store)->Pull(15, absl::Seconds(20), &pulled); });
  auto ahead = (*store)->Push(1, 1, FullPush(**store, 15, 5.0f));
  ASSERT_TRUE(ahead.ok()) << ahead.status();
  EXPECT_EQ(ahead->fast_forwarded, 1);
  waiter.join();
  EXPECT_TRUE(waited.ok()) << waited;  // released by the jump, not by the timeout
  EXPECT_EQ((*store)->stats().lost_steps, 15);
  ExpectShifted(before, AllParams(**store), 0.0f);  // step 14's partial sum is gone
  ASSERT_TRUE((*store)->Push(0, 1, FullPush(**store, 15, 3.0f)).ok());
  EXPECT_EQ((*store)->stats().version, 16);
  ExpectShifted(before, AllParams(**store), 4.0f);  // only step 15, as the mean of 5 and 3
  // Recovered: a push ahead is refused again.
  EXPECT_EQ((*store)->Push(1, 1, FullPush(**store, 20, 1.0f)).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(ShardStoreTest, SspBlocksOnlyBeyondTheStalenessBound) {
  // Two workers, staleness 1: worker 0 may run one clock ahead of worker 1.
  auto store = ShardStore::Create(ExactSumJob(tessera::v1::SSP, 2), 0);
  ASSERT_TRUE(store.ok());
  tessera::v1::PullResult pull;
  ASSERT_TRUE((*store)->Push(0, 1, FullPush(**store, 0, 1.0f)).ok());
  EXPECT_TRUE((*store)->Pull(1, absl::ZeroDuration(), &pull).ok());  // 1 - 0 <= 1
  ASSERT_TRUE((*store)->Push(0, 1, FullPush(**store, 1, 1.0f)).ok());
  EXPECT_EQ((*store)->Pull(2, absl::Milliseconds(20), &pull).code(),
            absl::StatusCode::kUnavailable);  // 2 - 0 > 1
  ASSERT_TRUE((*store)->Push(1, 1, FullPush(**store, 0, 1.0f)).ok());
  EXPECT_TRUE((*store)->Pull(2, absl::ZeroDuration(), &pull).ok());
  // A departed worker no longer holds the others back.
  (*store)->Disconnect(1, 1);
  EXPECT_TRUE((*store)->Pull(3, absl::ZeroDuration(), &pull).ok());  // 3 - 2 <= 1
}

TEST(ShardStoreTest, AsyncPullNeverWaits) {
  auto store = ShardStore::Create(ExactSumJob(tessera::v1::ASYNC, 3), 0);
  ASSERT_TRUE(store.ok());
  tessera::v1::PullResult pull;
  EXPECT_TRUE((*store)->Pull(1000, absl::ZeroDuration(), &pull).ok());
}

TEST(ShardStoreTest, ShutdownWakesWaitingPulls) {
  auto store = ShardStore::Create(ExactSumJob(tessera::v1::SYNC, 2), 0);
  ASSERT_TRUE(store.ok());
  absl::Status waited;
  std::thread puller([&] {
    tessera::v1::PullResult pull;
    waited = (*store)->Pull(1, absl::Seconds(30), &pull);
  });
  absl::SleepFor(absl::Milliseconds(30));
  (*store)->Shutdown();
  puller.join();
  EXPECT_EQ(waited.code(), absl::StatusCode::kUnavailable);
}

TEST(ShardStoreTest, Bf16PushesAndPullsKeepF32State) {
  JobSpec job = ExactSumJob(tessera::v1::ASYNC, 1);
  job.set_wire_dtype(tessera::v1::BF16);
  auto store = ShardStore::Create(job, 0);
  ASSERT_TRUE(store.ok());
  std::vector<float> before(10);
  {
    tessera::v1::PullResult pull;
    ASSERT_TRUE((*store)->Pull(0, absl::ZeroDuration(), &pull).ok());
    for (const auto& tb : pull.blocks()) {
      EXPECT_EQ(tb.dtype(), tessera::v1::BF16);
      EXPECT_EQ(tb.data().size(), 2 * (*store)->partition().blocks()[tb.block_id()].num_elements);
    }
  }
  const ShardState start = (*store)->Snapshot();
  PushRequest push = FullPush(**store, 0, 1.0f);
  for (auto& tb : *push.mutable_blocks()) {
    std::vector<float> ones(tb.data().size() / 4, 1.0f);
    tb.set_dtype(tessera::v1::BF16);
    EncodeBF16(ones, tb.mutable_data());
  }
  auto outcome = (*store)->Push(0, 1, push);
  ASSERT_TRUE(outcome.ok()) << outcome.status();
  // The F32 parameters moved by exactly one: no rounding to BF16 on the server.
  const ShardState end = (*store)->Snapshot();
  for (size_t b = 0; b < end.blocks.size(); ++b) {
    for (size_t i = 0; i < end.blocks[b].params.size(); ++i) {
      EXPECT_EQ(end.blocks[b].params[i], start.blocks[b].params[i] - 1.0f);
    }
  }
  // A BF16 block of F32 length is refused.
  PushRequest wrong = FullPush(**store, 1, 1.0f);
  wrong.mutable_blocks(0)->set_dtype(tessera::v1::BF16);
  EXPECT_EQ((*store)->Push(0, 1, wrong).status().code(), absl::StatusCode::kInvalidArgument);
}

// A sparse push of the elements at `positions` (within each block) set to
// `value`; every other element zero.
PushRequest SparsePush(const ShardStore& store, int64_t step, float value,
                       const std::vector<uint32_t>& positions) {
  PushRequest push;
  push.set_step(step);
  for (uint32_t id : store.partition().shard_blocks(store.shard())) {
    const BlockInfo& b = store.partition().blocks()[id];
    tessera::v1::TensorBlock* tb = push.add_blocks();
    tb->set_block_id(id);
    tb->set_dtype(tessera::v1::F32);
    tb->set_sparse(true);
    std::vector<float> values;
    for (uint32_t p : positions) {
      if (p >= b.num_elements) continue;
      tb->mutable_indices()->append(reinterpret_cast<const char*>(&p), 4);
      values.push_back(value);
    }
    EncodeF32(values, tb->mutable_data());
  }
  return push;
}

TEST(ShardStoreTest, SparsePushesMoveOnlyTheirElements) {
  for (auto mode : {tessera::v1::ASYNC, tessera::v1::SYNC}) {
    SCOPED_TRACE(tessera::v1::ConsistencyMode_Name(mode));
    auto store = ShardStore::Create(ExactSumJob(mode, 2), 0);
    ASSERT_TRUE(store.ok());
    const ShardState start = (*store)->Snapshot();
    // Worker 0 sends element 1 of every block, worker 1 elements 0 and 1.
    ASSERT_TRUE((*store)->Push(0, 1, SparsePush(**store, 0, 2.0f, {1})).ok());
    ASSERT_TRUE((*store)->Push(1, 1, SparsePush(**store, 0, 4.0f, {0, 1})).ok());
    const ShardState end = (*store)->Snapshot();
    for (size_t b = 0; b < end.blocks.size(); ++b) {
      for (size_t i = 0; i < end.blocks[b].params.size(); ++i) {
        // SGD, learning rate 1. ASYNC applies each push; SYNC their mean.
        float delta = 0;
        if (mode == tessera::v1::ASYNC) {
          delta = (i == 1 ? 2.0f : 0.0f) + (i <= 1 ? 4.0f : 0.0f);
        } else {
          delta = ((i == 1 ? 2.0f : 0.0f) + (i <= 1 ? 4.0f : 0.0f)) / 2;
        }
        EXPECT_EQ(end.blocks[b].params[i], start.blocks[b].params[i] - delta)
            << "block " << b << " element " << i;
      }
    }
  }
}

TEST(ShardStoreTest, MalformedSparsePushesAreRejectedAndChangeNothing) {
  auto store = ShardStore::Create(ExactSumJob(tessera::v1::ASYNC, 1), 0);
  ASSERT_TRUE(store.ok());
  const std::vector<float> before = AllParams(**store);
  PushRequest unsorted = SparsePush(**store, 0, 1.0f, {2, 0});
  PushRequest out_of_range = SparsePush(**store, 0, 1.0f, {0});
  const uint32_t far = 1000;
  out_of_range.mutable_blocks(0)->mutable_indices()->append(reinterpret_cast<const char*>(&far), 4);
  out_of_range.mutable_blocks(0)->mutable_data()->append(4, '\0');
  PushRequest indices_on_dense = FullPush(**store, 0, 1.0f);
  indices_on_dense.mutable_blocks(0)->set_indices(std::string(4, '\0'));
  PushRequest nan_value = SparsePush(**store, 0, std::numeric_limits<float>::quiet_NaN(), {0});
  int rejected = 0;
  for (const PushRequest* bad : {&unsorted, &out_of_range, &indices_on_dense, &nan_value}) {
    EXPECT_EQ((*store)->Push(0, 1, *bad).status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ((*store)->stats().requests_rejected, ++rejected);
    EXPECT_EQ(AllParams(**store), before);
  }
  EXPECT_EQ((*store)->stats().nonfinite_rejected, 1);
}

TEST(ShardStoreTest, CreateRejectsBadShard) {
  EXPECT_EQ(ShardStore::Create(ExactSumJob(tessera::v1::SYNC, 1, 2), 2).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// A job of 2 MiB of parameters in 64 KiB blocks, so pushes, steps and
// pulls run on the apply threads when there are several. Adam, so every
// block also updates two slots.
JobSpec LargeAdamJob(tessera::v1::ConsistencyMode mode, int workers) {
  JobSpec job = ExactSumJob(mode, workers);
  job.set_model("linear:1024-512");
  job.set_block_bytes(64 << 10);
  job.mutable_optimizer()->set_type(tessera::v1::ADAM);
  job.mutable_optimizer()->set_learning_rate(0.01);
  EXPECT_TRUE(ValidateJobSpec(&job).ok());
  return job;
}

// A dense push whose value for element k of block b is a fixed function of
// (step, worker, b, k), different in every block.
PushRequest VariedPush(const ShardStore& store, int64_t step, int worker) {
  return DensePush(store, step, [step, worker](uint32_t id, int64_t k) {
    return std::sin(0.001f * static_cast<float>(k + 7 * id + 13 * step + 101 * worker));
  });
}

TEST(ShardStoreTest, ApplyThreadsGiveTheSameParametersBitForBit) {
  for (auto mode : {tessera::v1::SYNC, tessera::v1::ASYNC}) {
    SCOPED_TRACE(tessera::v1::ConsistencyMode_Name(mode));
    auto one = ShardStore::Create(LargeAdamJob(mode, 2), 0);
    auto four = ShardStore::Create(LargeAdamJob(mode, 2), 0);
    ASSERT_TRUE(one.ok() && four.ok());
    (*four)->SetApplyThreads(4);
    // Enough besides the largest block for the threads to take part.
    int64_t largest = 0;
    for (uint32_t id : (*one)->partition().shard_blocks(0)) {
      largest = std::max(largest, (*one)->partition().blocks()[id].num_elements * 4);
    }
    ASSERT_GE((*one)->partition().shard_bytes(0) - largest, ShardStore::kParallelBytes);
    ASSERT_GT((*one)->partition().shard_blocks(0).size(), 8u);
    const std::vector<float> initial = AllParams(**one);
    for (int64_t step = 0; step < 3; ++step) {
      for (int worker = 0; worker < 2; ++worker) {
        const PushRequest push = VariedPush(**one, step, worker);
        ASSERT_TRUE((*one)->Push(worker, 1, push).ok());
        ASSERT_TRUE((*four)->Push(worker, 1, push).ok());
      }
    }
    const std::vector<float> after = AllParams(**one);
    EXPECT_NE(after, initial);
    EXPECT_EQ(AllParams(**four), after);
    EXPECT_EQ((*four)->stats().version, (*one)->stats().version);
    EXPECT_EQ((*one)->shared_apply_runs(), 0);
    EXPECT_GT((*four)->shared_apply_runs(), 0) << "the threads never took part";
    // Pulls into a same-host reply area, whole and too small for every
    // block (the rest go inline), come out byte for byte the same.
    const uint64_t full = SharedAreaBytes((*one)->partition().shard_bytes(0),
                                          (*one)->partition().shard_blocks(0).size());
    for (uint64_t area_bytes : {full, full / 3}) {
      std::vector<char> area_one(area_bytes, 0), area_four(area_bytes, 0);
      tessera::v1::PullResult pull_one, pull_four;
      ASSERT_TRUE((*one)->Pull(0, absl::ZeroDuration(), &pull_one, absl::MakeSpan(area_one)).ok());
      ASSERT_TRUE(
          (*four)->Pull(0, absl::ZeroDuration(), &pull_four, absl::MakeSpan(area_four)).ok());
      EXPECT_EQ(pull_four.SerializeAsString(), pull_one.SerializeAsString());
      EXPECT_TRUE(area_four == area_one);
      // And they hold the parameters: each block read back where its
      // message says, from the area or inline.
      int inline_blocks = 0;
      std::vector<float> read_back(after.size());
      for (const auto& tb : pull_four.blocks()) {
        inline_blocks += tb.shm_size() == 0;
        const absl::StatusOr<absl::string_view> payload = BlockPayload(tb, area_four);
        ASSERT_TRUE(payload.ok()) << payload.status();
        const BlockInfo& b = (*four)->partition().blocks()[tb.block_id()];
        ASSERT_TRUE(DecodeF32(tb.dtype(), *payload,
                              absl::MakeSpan(read_back).subspan(b.flat_offset, b.num_elements))
                        .ok());
      }
      EXPECT_EQ(read_back, after);
      EXPECT_EQ(inline_blocks > 0, area_bytes < full) << inline_blocks;
    }

    // A NaN in the last block: the whole push is refused on the threads
    // too, naming that block, and nothing changes.
    PushRequest bad = VariedPush(**four, 3, 0);
    const int last = bad.blocks_size() - 1;
    std::string* data = bad.mutable_blocks(last)->mutable_data();
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(data->data() + data->size() - sizeof(float), &nan, sizeof(float));
    const absl::StatusOr<PushOutcome> refused = (*four)->Push(0, 1, bad);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(refused.status().message().find(
                  absl::StrCat("block ", bad.blocks(last).block_id(), ": gradient has NaN")),
              std::string::npos)
        << refused.status();
    EXPECT_EQ((*four)->stats().nonfinite_rejected, 1);
    EXPECT_EQ(AllParams(**four), after);
  }
}

TEST(ApplyPoolTest, RunsEveryTaskOnceAlsoWhenTwoRunsOverlap) {
  ApplyPool pool(3);
  EXPECT_EQ(pool.threads(), 3);
  constexpr int kTasks = 2000;
  std::vector<std::atomic<int>> calls_a(kTasks), calls_b(kTasks);
  // Two callers at once: one gets the helpers, the other runs its own
  // tasks; neither may see the other's.
  std::thread other([&] {
    for (int round = 0; round < 20; ++round) {
      pool.Run(kTasks, [&](int i) { calls_b[i].fetch_add(1); });
    }
  });
  for (int round = 0; round < 20; ++round) {
    pool.Run(kTasks, [&](int i) { calls_a[i].fetch_add(1); });
  }
  other.join();
  for (int i = 0; i < kTasks; ++i) {
    ASSERT_EQ(calls_a[i].load(), 20) << "task " << i;
    ASSERT_EQ(calls_b[i].load(), 20) << "task " << i;
  }
  pool.Run(0, [](int) { FAIL() << "no task to run"; });
}

}  // namespace
}  // namespace tessera
