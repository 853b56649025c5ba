#include "server/checkpointer.h"

#include <iostream>

namespace tessera {

Checkpointer::Checkpointer(std::string dir, CheckpointInfo info, ModelSpec model, int keep)
    : dir_(std::move(dir)),
      info_(std::move(info)),
      model_(std::move(model)),
      keep_(keep),
      thread_([this] { Loop(); }) {}

Checkpointer::~Checkpointer() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
}

void Checkpointer::Submit(ShardState state) {
  absl::MutexLock lock(&mu_);
  pending_ = std::move(state);
}

void Checkpointer::Loop() {
  while (true) {
    ShardState state;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stop_ || pending_.has_value();
      };
      mu_.Await(absl::Condition(&ready));
      if (!pending_.has_value()) return;  // stopping with nothing queued
      state = *std::move(pending_);
      pending_.reset();
      writing_ = true;
    }
    Write(state);
    absl::MutexLock lock(&mu_);
    writing_ = false;
  }
}

CheckpointResult Checkpointer::Write(const ShardState& state) {
  absl::MutexLock write_lock(&write_mu_);
  absl::StatusOr<std::string> path = WriteShardCheckpoint(dir_, info_, model_, state, keep_);
  CheckpointResult result;
  result.step = state.step;
  if (path.ok()) {
    result.path = *path;
    std::cerr << "tessera-server: shard " << info_.shard << " checkpoint at step " << state.step
              << ": " << *path << std::endl;
  } else {
    result.status = path.status();
    std::cerr << "tessera-server: shard " << info_.shard << " checkpoint at step " << state.step
              << " failed: " << path.status().message() << std::endl;
  }
  absl::MutexLock lock(&mu_);
  result.generation = last_.generation + 1;
  last_ = result;
  return result;
}

CheckpointResult Checkpointer::WriteNow(const ShardState& state) {
  {
    absl::MutexLock lock(&mu_);
    auto drained = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return !pending_.has_value() && !writing_;
    };
    mu_.Await(absl::Condition(&drained));
  }
  return Write(state);
}

CheckpointResult Checkpointer::last() const {
  absl::MutexLock lock(&mu_);
  return last_;
}

absl::StatusOr<CheckpointResult> Checkpointer::WaitAfter(int64_t generation,
                                                         absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto done = [this, generation]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return last_.generation > generation;
  };
  if (!mu_.AwaitWithTimeout(absl::Condition(&done), timeout)) {
    return absl::DeadlineExceededError("no checkpoint was written in time");
  }
  return last_;
}

}  // namespace tessera
