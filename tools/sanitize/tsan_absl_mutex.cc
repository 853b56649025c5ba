// ThreadSanitizer support for Debian's prebuilt Abseil (TSan builds only).
//
// Debian's libabsl_synchronization is not built with -fsanitize=thread, so
// TSan never sees absl::Mutex lock or unlock: every field guarded by an
// absl::Mutex would be reported as racing, and a suppression broad enough
// to hide that would hide real races too. This file, linked into every
// executable of a TSan build (TESSERA_SANITIZE=thread), interposes the
// out-of-line absl::Mutex, CondVar and Notification entry points: each
// wrapper calls Abseil's own implementation (found with dlsym(RTLD_NEXT))
// and tells TSan about the happens-before edge it makes:
//   - release on the mutex before any unlock (also before Await and
//     CondVar waits, which unlock inside), acquire after any lock;
//   - Notify releases, a wait that saw the notification acquires;
//   - memory accesses inside Abseil's calls are ignored: an unlocking
//     thread evaluates waiters' Conditions (which read guarded fields) while
//     handing the lock over, which TSan could not order otherwise.
// What stays checked: every access outside those calls, in this project's
// code and in everything else that is instrumented.

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/base/options.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

extern "C" {
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_ignore_thread_begin();
void __tsan_ignore_thread_end();
}

static_assert(ABSL_OPTION_USE_INLINE_NAMESPACE == 1,
              "the mangled names below assume Abseil's inline namespace");

namespace {

#define TESSERA_TSAN_STR_(x) #x
#define TESSERA_TSAN_STR(x) TESSERA_TSAN_STR_(x)

// The mangled name of absl::<inline namespace>::`rest`; `konst` for const
// member functions.
std::string Mangled(const char* rest, bool konst = false) {
  const std::string ns = TESSERA_TSAN_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME);
  return std::string(konst ? "_ZNK4absl" : "_ZN4absl") + std::to_string(ns.size()) + ns + rest;
}

template <typename Fn>
Fn Real(const char* rest, bool konst = false) {
  const std::string name = Mangled(rest, konst);
  void* f = dlsym(RTLD_NEXT, name.c_str());
  if (f == nullptr) {
    std::fprintf(stderr, "tsan_absl_mutex: cannot find %s in Abseil\n", name.c_str());
    std::abort();
  }
  return reinterpret_cast<Fn>(f);
}

// Runs Abseil's own code with TSan's memory checks off for this thread.
class IgnoreAccesses {
 public:
  IgnoreAccesses() { __tsan_ignore_thread_begin(); }
  ~IgnoreAccesses() { __tsan_ignore_thread_end(); }
  IgnoreAccesses(const IgnoreAccesses&) = delete;
  IgnoreAccesses& operator=(const IgnoreAccesses&) = delete;
};

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

// --- Mutex: plain lock and unlock ------------------------------------------

void Mutex::Lock() {
  static const auto real = Real<void (*)(Mutex*)>("5Mutex4LockEv");
  {
    IgnoreAccesses ignore;
    real(this);
  }
  __tsan_acquire(this);
}

void Mutex::ReaderLock() {
  static const auto real = Real<void (*)(Mutex*)>("5Mutex10ReaderLockEv");
  {
    IgnoreAccesses ignore;
    real(this);
  }
  __tsan_acquire(this);
}

bool Mutex::TryLock() {
  static const auto real = Real<bool (*)(Mutex*)>("5Mutex7TryLockEv");
  bool locked;
  {
    IgnoreAccesses ignore;
    locked = real(this);
  }
  if (locked) __tsan_acquire(this);
  return locked;
}

bool Mutex::ReaderTryLock() {
  static const auto real = Real<bool (*)(Mutex*)>("5Mutex13ReaderTryLockEv");
  bool locked;
  {
    IgnoreAccesses ignore;
    locked = real(this);
  }
  if (locked) __tsan_acquire(this);
  return locked;
}

void Mutex::Unlock() {
  static const auto real = Real<void (*)(Mutex*)>("5Mutex6UnlockEv");
  __tsan_release(this);
  IgnoreAccesses ignore;
  real(this);
}

void Mutex::ReaderUnlock() {
  static const auto real = Real<void (*)(Mutex*)>("5Mutex12ReaderUnlockEv");
  __tsan_release(this);
  IgnoreAccesses ignore;
  real(this);
}

// --- Mutex: lock when a condition holds --------------------------------------

void Mutex::LockWhen(const Condition& cond) {
  static const auto real =
      Real<void (*)(Mutex*, const Condition&)>("5Mutex8LockWhenERKNS0_9ConditionE");
  {
    IgnoreAccesses ignore;
    real(this, cond);
  }
  __tsan_acquire(this);
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  static const auto real =
      Real<void (*)(Mutex*, const Condition&)>("5Mutex14ReaderLockWhenERKNS0_9ConditionE");
  {
    IgnoreAccesses ignore;
    real(this, cond);
  }
  __tsan_acquire(this);
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, Duration timeout) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, Duration)>(
      "5Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  bool met;
  {
    IgnoreAccesses ignore;
    met = real(this, cond, timeout);
  }
  __tsan_acquire(this);  // held whether or not the condition became true
  return met;
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, Time deadline) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, Time)>(
      "5Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  bool met;
  {
    IgnoreAccesses ignore;
    met = real(this, cond, deadline);
  }
  __tsan_acquire(this);
  return met;
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, Duration timeout) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, Duration)>(
      "5Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  bool met;
  {
    IgnoreAccesses ignore;
    met = real(this, cond, timeout);
  }
  __tsan_acquire(this);
  return met;
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, Time deadline) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, Time)>(
      "5Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  bool met;
  {
    IgnoreAccesses ignore;
    met = real(this, cond, deadline);
  }
  __tsan_acquire(this);
  return met;
}

// --- Mutex: wait while holding (unlocks and locks again inside) --------------

void Mutex::Await(const Condition& cond) {
  static const auto real =
      Real<void (*)(Mutex*, const Condition&)>("5Mutex5AwaitERKNS0_9ConditionE");
  __tsan_release(this);
  {
    IgnoreAccesses ignore;
    real(this, cond);
  }
  __tsan_acquire(this);
}

bool Mutex::AwaitWithTimeout(const Condition& cond, Duration timeout) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, Duration)>(
      "5Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  __tsan_release(this);
  bool met;
  {
    IgnoreAccesses ignore;
    met = real(this, cond, timeout);
  }
  __tsan_acquire(this);
  return met;
}

bool Mutex::AwaitWithDeadline(const Condition& cond, Time deadline) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, Time)>(
      "5Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  __tsan_release(this);
  bool met;
  {
    IgnoreAccesses ignore;
    met = real(this, cond, deadline);
  }
  __tsan_acquire(this);
  return met;
}

// --- CondVar -------------------------------------------------------------------

void CondVar::Wait(Mutex* mu) {
  static const auto real = Real<void (*)(CondVar*, Mutex*)>("7CondVar4WaitEPNS0_5MutexE");
  __tsan_release(mu);
  {
    IgnoreAccesses ignore;
    real(this, mu);
  }
  __tsan_acquire(mu);
}

bool CondVar::WaitWithTimeout(Mutex* mu, Duration timeout) {
  static const auto real = Real<bool (*)(CondVar*, Mutex*, Duration)>(
      "7CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  __tsan_release(mu);
  bool timed_out;
  {
    IgnoreAccesses ignore;
    timed_out = real(this, mu, timeout);
  }
  __tsan_acquire(mu);
  return timed_out;
}

bool CondVar::WaitWithDeadline(Mutex* mu, Time deadline) {
  static const auto real = Real<bool (*)(CondVar*, Mutex*, Time)>(
      "7CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  __tsan_release(mu);
  bool timed_out;
  {
    IgnoreAccesses ignore;
    timed_out = real(this, mu, deadline);
  }
  __tsan_acquire(mu);
  return timed_out;
}

// --- Notification --------------------------------------------------------------

void Notification::Notify() {
  static const auto real = Real<void (*)(Notification*)>("12Notification6NotifyEv");
  __tsan_release(this);
  IgnoreAccesses ignore;
  real(this);
}

void Notification::WaitForNotification() const {
  static const auto real =
      Real<void (*)(const Notification*)>("12Notification19WaitForNotificationEv", true);
  {
    IgnoreAccesses ignore;
    real(this);
  }
  __tsan_acquire(const_cast<Notification*>(this));
}

bool Notification::WaitForNotificationWithTimeout(Duration timeout) const {
  static const auto real = Real<bool (*)(const Notification*, Duration)>(
      "12Notification30WaitForNotificationWithTimeoutENS0_8DurationE", true);
  bool notified;
  {
    IgnoreAccesses ignore;
    notified = real(this, timeout);
  }
  if (notified) __tsan_acquire(const_cast<Notification*>(this));
  return notified;
}

bool Notification::WaitForNotificationWithDeadline(Time deadline) const {
  static const auto real = Real<bool (*)(const Notification*, Time)>(
      "12Notification31WaitForNotificationWithDeadlineENS0_4TimeE", true);
  bool notified;
  {
    IgnoreAccesses ignore;
    notified = real(this, deadline);
  }
  if (notified) __tsan_acquire(const_cast<Notification*>(this));
  return notified;
}

ABSL_NAMESPACE_END
}  // namespace absl
