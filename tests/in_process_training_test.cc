// Trainer + ShardStore in one process, without gRPC: the consistency
// contracts checked on the real training loop.

#include <cmath>
#include <thread>

#include "common/job_spec.h"
#include "common/status_macros.h"
#include "gtest/gtest.h"
#include "server/shard_store.h"
#include "tests/in_process_client.h"
#include "worker/cpu_backend.h"
#include "worker/job_data.h"
#include "worker/trainer.h"

namespace tessera {
namespace {

using tessera::v1::JobSpec;

JobSpec RegressionJob(int workers, int batch, tessera::v1::ConsistencyMode mode) {
  JobSpec job;
  job.set_name("in-process");
  job.set_model("mlp:10-16-1");
  job.set_loss(tessera::v1::MEAN_SQUARED_ERROR);
  job.mutable_data()->set_format(tessera::v1::SYNTHETIC_REGRESSION);
  job.mutable_data()->set_num_samples(1000);
  job.mutable_data()->set_validation_fraction(0.2);
  job.mutable_optimizer()->set_type(tessera::v1::ADAM);
  job.mutable_optimizer()->set_learning_rate(0.01);
  job.mutable_consistency()->set_mode(mode);
  job.mutable_consistency()->set_staleness(2);
  job.set_batch_size(batch);
  job.set_epochs(3);
  job.set_num_shards(2);
  job.set_num_workers(workers);
  job.set_seed(11);
  job.set_block_bytes(64);  // many blocks per tensor, spread over both shards
  EXPECT_TRUE(ValidateJobSpec(&job).ok());
  return job;
}

// Variance of the held-out targets: the MSE of predicting their mean.
double TestTargetVariance(const JobSpec& job) {
  auto model = ParseModelSpec(job.model(), JobLoss(job));
  EXPECT_TRUE(model.ok());
  auto data = LoadJobData(job, *model);
  EXPECT_TRUE(data.ok());
  double mean = 0, var = 0;
  for (float t : data->test.targets) mean += t;
  mean /= data->test.targets.size();
  for (float t : data->test.targets) var += (t - mean) * (t - mean);
  return var / data->test.targets.size();
}

// Runs every worker of `job` in its own thread against in-process shards;
// returns each worker's summary.
// `stores_out`, when given, receives the shards, so their counters can be
// read after the run.
std::vector<TrainSummary> RunCluster(
    const JobSpec& job, std::vector<std::unique_ptr<ShardStore>>* stores_out = nullptr) {
  absl::StatusOr<ModelSpec> model = ParseModelSpec(job.model(), JobLoss(job));
  EXPECT_TRUE(model.ok());
  absl::StatusOr<JobData> data = LoadJobData(job, *model);
  EXPECT_TRUE(data.ok()) << data.status();
  std::vector<std::unique_ptr<ShardStore>> stores;
  std::vector<ShardStore*> raw;
  for (int s = 0; s < job.num_shards(); ++s) {
    auto store = ShardStore::Create(job, s);
    EXPECT_TRUE(store.ok()) << store.status();
    raw.push_back(store->get());
    stores.push_back(*std::move(store));
  }
  std::vector<TrainSummary> summaries(job.num_workers());
  std::vector<std::thread> threads;
  for (int r = 0; r < job.num_workers(); ++r) {
    threads.emplace_back([&, r] {
      auto backend = CreateCpuBackend(*model, 512);
      ASSERT_TRUE(backend.ok());
      InProcessClient client(raw, r, 1);
      TrainerOptions options;
      options.rank = r;
      auto summary = Train(job, *model, data->train, data->test, backend->get(),
                           &client, options);
      ASSERT_TRUE(summary.ok()) << summary.status();
      summaries[r] = *std::move(summary);
      for (ShardStore* s : raw) s->Disconnect(r, 1);
    });
  }
  for (auto& t : threads) t.join();
  if (stores_out != nullptr) *stores_out = std::move(stores);
  return summaries;
}

TEST(InProcessTrainingTest, SyncTwoWorkersEqualOneWorkerWithDoubleBatch) {
  JobSpec two = RegressionJob(2, 8, tessera::v1::SYNC);
  JobSpec one = RegressionJob(1, 16, tessera::v1::SYNC);
  two.set_max_steps(60);
  one.set_max_steps(60);
  std::vector<TrainSummary> a = RunCluster(two);
  std::vector<TrainSummary> b = RunCluster(one);
  ASSERT_EQ(a[0].steps, 60);
  ASSERT_EQ(b[0].steps, 60);
  const std::vector<float>& pa = a[0].final_params;
  const std::vector<float>& pb = b[0].final_params;
  ASSERT_EQ(pa.size(), pb.size());
  double max_rel = 0, moved = 0;
  for (size_t i = 0; i < pa.size(); ++i) {
    max_rel = std::max(max_rel, std::abs(pa[i] - pb[i]) / std::max(1e-3, std::abs(1.0 * pb[i])));
  }
  // Both workers end with the same parameters too.
  EXPECT_EQ(a[0].final_params, a[1].final_params);
  // Float tolerance: the two runs sum a step's rows in different groupings,
  // and how far they drift apart in 60 Adam steps depends on the vector
  // width (5e-6 built for AVX2, 2e-5 for AVX-512 on the development VM).
  // Training on one worker's half of each batch alone ends about 100 away.
  EXPECT_LE(max_rel, 1e-4);
  // Guard against a vacuous pass: training moved the parameters.
  JobSpec untrained = one;
  untrained.set_max_steps(1);
  std::vector<TrainSummary> c = RunCluster(untrained);
  for (size_t i = 0; i < pb.size(); ++i) moved += std::abs(pb[i] - c[0].final_params[i]);
  EXPECT_GT(moved, 0.1);
}

TEST(InProcessTrainingTest, EveryModeLearnsTheSeedRegression) {
  for (auto mode : {tessera::v1::SYNC, tessera::v1::ASYNC, tessera::v1::SSP}) {
    SCOPED_TRACE(ModeName(mode));
    const JobSpec job = RegressionJob(2, 16, mode);
    std::vector<TrainSummary> s = RunCluster(job);
    ASSERT_EQ(s[0].epochs.size(), 3u);
    // Better than predicting the mean by a wide margin: the MSE of the mean
    // predictor is the targets' variance.
    const double var = TestTargetVariance(job);
    EXPECT_LT(s[0].epochs.back().val_loss, 0.3 * var) << "target variance " << var;
  }
}

TEST(InProcessTrainingTest, OverlappedAsyncAndSspLearnAndPushEveryStepOnce) {
  for (auto mode : {tessera::v1::ASYNC, tessera::v1::SSP}) {
    SCOPED_TRACE(ModeName(mode));
    JobSpec job = RegressionJob(2, 16, mode);
    job.set_overlap(true);
    std::vector<std::unique_ptr<ShardStore>> stores;
    std::vector<TrainSummary> s = RunCluster(job, &stores);
    ASSERT_EQ(s[0].epochs.size(), 3u);
    // 800 training rows, 2 workers x 16: 25 steps per epoch, 75 in all, and
    // every one of each worker's pushes reached every shard exactly once.
    EXPECT_EQ(s[0].steps, 75);
    for (const auto& store : stores) {
      EXPECT_EQ(store->stats().pushes_applied, 2 * 75);
      EXPECT_EQ(store->stats().pushes_duplicate, 0);
    }
    const double var = TestTargetVariance(job);
    EXPECT_LT(s[0].epochs.back().val_loss, 0.3 * var) << "target variance " << var;
  }
}

// Trains one worker of `job` (CPU backend) against `client`.
absl::StatusOr<TrainSummary> TrainOneWorker(const JobSpec& job, ParameterClient* client,
                                            const TrainerOptions& options) {
  TESSERA_ASSIGN_OR_RETURN(const ModelSpec model, ParseModelSpec(job.model(), JobLoss(job)));
  TESSERA_ASSIGN_OR_RETURN(const JobData data, LoadJobData(job, model));
  TESSERA_ASSIGN_OR_RETURN(std::unique_ptr<GradientBackend> backend,
                           CreateCpuBackend(model, 512));
  return Train(job, model, data.train, data.test, backend.get(), client, options);
}

// Parameters that stay put, and a version that jumps ahead once: what a
// synchronous worker sees after being cut off while the others went on.
class JumpingClient final : public ParameterClient {
 public:
  JumpingClient(int64_t jump_at, int64_t jump_to) : jump_at_(jump_at), jump_to_(jump_to) {}
  absl::StatusOr<int64_t> Pull(int64_t step, absl::Span<float> params) override { return 0; }
  absl::StatusOr<PushPullResult> PushAndPull(int64_t step, absl::Span<const float> grads,
                                             absl::Span<float> params) override {
    pushed.push_back(step);
    // Both shards' steps closed without this push: late, not repeats.
    if (step == jump_at_) return PushPullResult{2, jump_to_, 2};
    return PushPullResult{0, step + 1};
  }
  std::vector<int64_t> pushed;

 private:
  const int64_t jump_at_, jump_to_;
};

// An asynchronous worker restarted with a new incarnation: the servers
// report the steps its id already completed, and it continues from there.
class ResumingClient final : public ParameterClient {
 public:
  explicit ResumingClient(int64_t resume) : resume_(resume) {}
  absl::StatusOr<int64_t> Pull(int64_t step, absl::Span<float> params) override { return 0; }
  absl::StatusOr<PushPullResult> PushAndPull(int64_t step, absl::Span<const float> grads,
                                             absl::Span<float> params) override {
    pushed.push_back(step);
    return PushPullResult{0, step + 1};
  }
  int64_t resume_step() const override { return resume_; }
  std::vector<int64_t> pushed;

 private:
  const int64_t resume_;
};

TEST(InProcessTrainingTest, RestartedAsyncWorkerContinuesFromItsClock) {
  JobSpec job = RegressionJob(2, 8, tessera::v1::ASYNC);  // 50 steps per epoch
  job.set_epochs(2);
  ResumingClient client(73);
  TrainerOptions options;
  options.rank = 1;
  auto summary = TrainOneWorker(job, &client, options);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->first_step, 73);
  EXPECT_EQ(summary->steps, 100 - 73);
  ASSERT_FALSE(client.pushed.empty());
  EXPECT_EQ(client.pushed.front(), 73);
  EXPECT_EQ(client.pushed.back(), 99);
  // Only the second epoch's line: the first was finished before the restart.
  EXPECT_EQ(summary->epochs.size(), 1u);
  // A resume point past the end means there is nothing left to do.
  ResumingClient done(1000);
  auto none = TrainOneWorker(job, &done, options);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->steps, 0);
  EXPECT_TRUE(done.pushed.empty());
}

TEST(InProcessTrainingTest, SyncWorkerThatFellBehindSkipsClosedSteps) {
  JobSpec job = RegressionJob(2, 8, tessera::v1::SYNC);  // 50 steps per epoch
  job.set_epochs(2);
  JumpingClient client(/*jump_at=*/5, /*jump_to=*/70);
  TrainerOptions options;
  auto summary = TrainOneWorker(job, &client, options);
  ASSERT_TRUE(summary.ok()) << summary.status();
  // Steps 6..69 were closed by the others: not replayed.
  ASSERT_GE(client.pushed.size(), 8u);
  EXPECT_EQ(client.pushed[5], 5);
  EXPECT_EQ(client.pushed[6], 70);
  EXPECT_EQ(client.pushed.back(), 99);
  EXPECT_EQ(summary->skipped_steps, 64);
  EXPECT_EQ(summary->steps, 100 - 64);
  EXPECT_EQ(summary->late_acks, 2);
  EXPECT_EQ(summary->duplicate_acks, 0);
  // Both epochs still end with an evaluation.
  EXPECT_EQ(summary->epochs.size(), 2u);
}

}  // namespace
}  // namespace tessera
