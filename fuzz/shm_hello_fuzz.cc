// Fuzzes the shared-memory part of a Session's Hello: the name, size and
// nonce a client announces, which the server hands to SharedRegion::Open
// (shm_open of a client-chosen name, then fstat, mmap and the header
// check), as ParameterServiceImpl::Session does for a local peer.
//
// One real region is created first, so that inputs can name it with a right
// or wrong size and nonce, as well as names that do not exist or do not
// match the pattern. Invariants beyond "no crash, no sanitizer report":
//   - a name outside "/tessera-[0-9a-f-]" (at most 64 bytes) is refused
//     before any system call, with kInvalidArgument;
//   - Open succeeds only for the real region with its exact size and nonce,
//     and the areas it maps then match the creator's;
//   - a refusal leaves the real region intact (the right Hello still opens).

#include <fuzzer/FuzzedDataProvider.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "common/shared_region.h"
#include "fuzz/fuzz_util.h"

namespace tessera::fuzz {
namespace {

constexpr uint64_t kMax = 1 << 20;

// Created once per process; its destructor at exit removes the name.
SharedRegion& Real() {
  static std::unique_ptr<SharedRegion> region = [] {
    absl::StatusOr<std::unique_ptr<SharedRegion>> r = SharedRegion::Create(8192, 4096);
    if (!r.ok()) Fail(std::string(r.status().message()));
    return *std::move(r);
  }();
  return *region;
}

bool NameMatchesPattern(const std::string& name) {
  if (!absl::StartsWith(name, "/tessera-") || name.size() > 64 || name.size() == 9) return false;
  for (char c : name.substr(9)) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || c == '-')) return false;
  }
  return true;
}

void Run(FuzzedDataProvider& in) {
  SharedRegion& real = Real();
  std::string name;
  switch (in.ConsumeIntegralInRange<int>(0, 2)) {
    case 0: name = real.name(); break;
    case 1: name = "/tessera-" + in.ConsumeRandomLengthString(70); break;
    default: name = in.ConsumeRandomLengthString(80);
  }
  const uint64_t size = in.ConsumeBool() ? real.size() : in.ConsumeIntegral<uint64_t>();
  std::string nonce(real.nonce());
  if (in.ConsumeBool()) nonce = in.ConsumeRandomLengthString(20);
  const uint64_t max = in.ConsumeBool() ? kMax : in.ConsumeIntegral<uint64_t>();

  absl::StatusOr<std::unique_ptr<SharedRegion>> opened = SharedRegion::Open(name, size, nonce, max);
  if (!NameMatchesPattern(name)) {
    Check(absl::IsInvalidArgument(opened.status()), "a name outside the pattern was not refused");
  }
  const bool exact = name == real.name() && size == real.size() && nonce == real.nonce() &&
                     size <= max;
  Check(opened.ok() == exact, "Open's outcome does not match the announced region");
  if (opened.ok()) {
    Check((*opened)->request_area().size() == real.request_area().size() &&
              (*opened)->reply_area().size() == real.reply_area().size(),
          "mapped areas differ from the creator's");
  }
  Check(SharedRegion::Open(real.name(), real.size(), real.nonce(), kMax).ok(),
        "the real region no longer opens after a refused Hello");
}

}  // namespace
}  // namespace tessera::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  tessera::fuzz::Run(in);
  return 0;
}
