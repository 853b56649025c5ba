// Command-line plumbing shared by the three binaries' *_main.cc files:
// the job-override flags and a --help that exits 0. Linked only into
// binaries; libraries never read flags.

#ifndef TESSERA_COMMON_FLAGS_H_
#define TESSERA_COMMON_FLAGS_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/credentials.h"
#include "common/job_spec.h"
#include "common/socket_tuning.h"

namespace tessera {

// Parses the command line. On --help or -h prints `usage` and the flags
// defined in *_main.cc files and in this library, then exits 0. Unknown or
// malformed flags print one line and exit 1. Returns the positional
// arguments (argv[0] first).
std::vector<char*> ParseFlagsOrExit(int argc, char** argv, const char* usage);

// The job file given with --job ("" when missing).
std::string JobFlag();

// The override flags that were given (--epochs, --batch_size, --mode, ...).
JobOverrides JobOverridesFromFlags();

// --tls_ca, --tls_cert, --tls_key, --token_file, --admin_token_file.
SecurityFiles SecurityFilesFromFlags();

// --tcp_rto_min_us and --tcp_congestion, checked against this kernel:
// kInvalidArgument naming the flag for a value the kernel refuses. On a
// kernel without a per-socket floor the floor is 0 (the system's), with a
// warning on stderr when the flag was given. Loopback connections get
// cubic where the kernel lets this process use it.
absl::StatusOr<SocketTuning> SocketTuningFromFlags();

// --shared_memory.
bool SharedMemoryFromFlags();

// --layerwise_push (workers).
bool LayerwisePushFromFlags();

// --stream_part_bytes (workers), or `default_bytes` when not given;
// kInvalidArgument naming the flag when negative.
absl::StatusOr<int64_t> StreamPartBytesFromFlags(int64_t default_bytes);

// The given security flags as arguments, for child processes.
std::vector<std::string> ForwardedSecurityFlags();

// The given override flags as "--name=value" arguments, to pass on to
// child processes so that every process computes the same job; also
// --tcp_rto_min_us, --tcp_congestion and --stream_part_bytes when given,
// --shared_memory=false and --layerwise_push=true.
std::vector<std::string> ForwardedJobFlags();

// Writes `port` and a newline to `path` through a temporary file and a
// rename, so a process polling for the file never reads a partial one.
// Returns false when the file cannot be written.
bool WritePortFile(const std::string& path, int port);

}  // namespace tessera

#endif  // TESSERA_COMMON_FLAGS_H_
