// Process-wide allocator settings for processes that move large messages.

#ifndef TESSERA_COMMON_ALLOCATOR_H_
#define TESSERA_COMMON_ALLOCATOR_H_

namespace tessera {

// Keeps freed memory of any size in glibc's heap for reuse instead of
// returning it to the kernel. By default glibc serves blocks above a
// (dynamic, at most 32 MiB) threshold with fresh mmap()s and unmaps them on
// free, so every multi-MiB push or pull that gRPC and protobuf allocate lands
// in newly faulted, zeroed pages: copying into such pages runs at about
// 2 GB/s on the reference machine against 11-38 GB/s into warm memory, and
// halved the transport's throughput at 16 and 64 MiB (bench/results/
// analysis.md). With this, resident memory stays at its peak, which for a
// parameter server or worker is its steady state. It also keeps glibc to
// one heap (arena): the load test's server then settles at about 47 MB
// within 15 s instead of climbing past 120 MB, with the same or better
// throughput on the reference machine.
//
// Does nothing when GLIBC_TUNABLES sets any glibc.malloc option, so an
// operator's explicit choice wins. Call once, first thing in main().
void TuneAllocatorForLargeMessages();

}  // namespace tessera

#endif  // TESSERA_COMMON_ALLOCATOR_H_
