#include "common/allocator.h"

#include <cstdlib>
#include <cstring>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace tessera {

void TuneAllocatorForLargeMessages() {
#if defined(__GLIBC__)
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if (tunables != nullptr && std::strstr(tunables, "glibc.malloc.") != nullptr) return;
  // Fixed values also turn off glibc's dynamic threshold adjustment.
  mallopt(M_MMAP_THRESHOLD, 512 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  // One heap instead of glibc's eight per core: with freed blocks kept,
  // each heap grows to the largest messages the threads using it have
  // held, so more heaps mean more resident memory and a longer climb to
  // the steady state. Small allocations still go through each thread's
  // cache without the heap's lock. MALLOC_ARENA_MAX, when set, wins.
  if (std::getenv("MALLOC_ARENA_MAX") == nullptr) mallopt(M_ARENA_MAX, 1);
#endif
}

}  // namespace tessera
