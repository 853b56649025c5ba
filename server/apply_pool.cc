#include "server/apply_pool.h"

#include <sched.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <string>

namespace tessera {
namespace {

// ceil(quota / period) from a cgroup's files; 0 when there is no quota.
int CgroupCpuQuota() {
  double quota = -1, period = 0;
  std::ifstream v2("/sys/fs/cgroup/cpu.max");
  std::string q;
  if (v2 >> q >> period) {
    if (q != "max") quota = std::strtod(q.c_str(), nullptr);
  } else {
    std::ifstream v1q("/sys/fs/cgroup/cpu/cpu.cfs_quota_us");
    std::ifstream v1p("/sys/fs/cgroup/cpu/cpu.cfs_period_us");
    if (!(v1q >> quota) || !(v1p >> period)) quota = -1;
  }
  if (quota <= 0 || period <= 0) return 0;
  return std::max(1, static_cast<int>((quota + period - 1) / period));
}

}  // namespace

int AvailableCpus() {
  int cpus = 1;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = std::max(1, CPU_COUNT(&set));
  const int quota = CgroupCpuQuota();
  if (quota > 0) cpus = std::min(cpus, quota);
  return cpus;
}

int DefaultApplyThreads() { return std::min(4, AvailableCpus()); }

ApplyPool::ApplyPool(int threads) {
  for (int i = 1; i < threads; ++i) helpers_.emplace_back([this] { HelperLoop(); });
}

ApplyPool::~ApplyPool() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  for (std::thread& t : helpers_) t.join();
}

void ApplyPool::Run(int n, absl::FunctionRef<void(int)> fn) {
  if (n <= 0) return;
  if (helpers_.empty() || n == 1) {
    for (int i = 0; i < n; ++i) fn(i);
    return;
  }
  if (!run_mu_.TryLock()) {  // another Run has the helpers
    for (int i = 0; i < n; ++i) fn(i);
    return;
  }
  shared_runs_.fetch_add(1, std::memory_order_relaxed);
  {
    absl::MutexLock lock(&mu_);
    fn_ = &fn;
    n_ = n;
    next_ = 0;
    finished_ = 0;
    ++generation_;
  }
  Work();
  {
    absl::MutexLock lock(&mu_);
    auto all_returned = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return finished_ == n_; };
    mu_.Await(absl::Condition(&all_returned));
    // Every task is claimed, so no helper reads fn_ again; clearing it
    // anyway keeps a dangling reference out of reach.
    fn_ = nullptr;
    n_ = 0;
    next_ = 0;
  }
  run_mu_.Unlock();
}

void ApplyPool::Work() {
  while (true) {
    const absl::FunctionRef<void(int)>* fn;
    int i;
    {
      absl::MutexLock lock(&mu_);
      if (next_ >= n_) return;
      i = next_++;
      fn = fn_;
    }
    (*fn)(i);
    absl::MutexLock lock(&mu_);
    ++finished_;
  }
}

void ApplyPool::HelperLoop() {
  uint64_t seen = 0;
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      auto wake = [this, &seen]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stop_ || (generation_ != seen && next_ < n_);
      };
      mu_.Await(absl::Condition(&wake));
      if (stop_) return;
      seen = generation_;
    }
    Work();
  }
}

}  // namespace tessera
