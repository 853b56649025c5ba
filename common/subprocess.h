// Child processes for the local launcher and process-level tests.

#ifndef TESSERA_COMMON_SUBPROCESS_H_
#define TESSERA_COMMON_SUBPROCESS_H_

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace tessera {

struct SpawnOptions {
  std::vector<std::string> argv;  // argv[0] is the program path
  // Files for the child's output; empty inherits the parent's.
  std::string stdout_path;
  std::string stderr_path;
};

// A running (or finished) child process, in a process group of its own (so
// a terminal's Ctrl-C reaches only the parent). The child gets SIGTERM if
// this process dies first, and the destructor kills (SIGKILL) and reaps a child
// still running, so no child outlives its owner. Not thread-safe.
class Subprocess {
 public:
  // kNotFound when the program does not exist or is not executable;
  // kInternal when fork fails.
  static absl::StatusOr<std::unique_ptr<Subprocess>> Spawn(const SpawnOptions& options);

  ~Subprocess();
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;

  pid_t pid() const { return pid_; }
  // Sends `sig` if the child is still running.
  void Signal(int sig);
  // Exit status if the child has ended: the exit code, or 128 + signal
  // number when a signal ended it. Does not block.
  std::optional<int> Poll();
  // Waits up to `timeout` for the child to end; nullopt on timeout.
  std::optional<int> Wait(absl::Duration timeout);
  // SIGTERM, then SIGKILL after `grace`; returns the exit status.
  int Stop(absl::Duration grace);

 private:
  explicit Subprocess(pid_t pid) : pid_(pid) {}
  pid_t pid_;
  std::optional<int> status_;
};

// The folder of the running executable (from /proc/self/exe), where the
// other Tessera binaries are installed beside it; "." when unknown.
std::string ThisExecutableDir();

}  // namespace tessera

#endif  // TESSERA_COMMON_SUBPROCESS_H_
