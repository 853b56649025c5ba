#include "common/subprocess.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace tessera {
namespace {

int DecodeWaitStatus(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

// Runs in the forked child before exec: only async-signal-safe calls.
void RedirectOrDie(const std::string& path, int fd) {
  if (path.empty()) return;
  int f = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (f < 0 || dup2(f, fd) < 0) _exit(127);
  close(f);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Subprocess>> Subprocess::Spawn(
    const SpawnOptions& options) {
  if (options.argv.empty()) return absl::InvalidArgumentError("empty argv");
  if (access(options.argv[0].c_str(), X_OK) != 0) {
    return absl::NotFoundError(
        absl::StrCat("cannot execute '", options.argv[0], "': ", std::strerror(errno)));
  }
  std::vector<char*> argv;
  for (const std::string& a : options.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  // Signals the parent blocks for sigwait must not stay blocked in the child.
  sigset_t empty;
  sigemptyset(&empty);
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  if (pid == 0) {
    // Own process group: a terminal's Ctrl-C reaches only the parent, which
    // stops its children in the order it chooses.
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(127);  // the parent died before prctl
    sigprocmask(SIG_SETMASK, &empty, nullptr);
    RedirectOrDie(options.stdout_path, STDOUT_FILENO);
    if (!options.stderr_path.empty() && options.stderr_path == options.stdout_path) {
      // One file for both: share one open file (and offset), or the two
      // streams overwrite each other's bytes.
      if (dup2(STDOUT_FILENO, STDERR_FILENO) < 0) _exit(127);
    } else {
      RedirectOrDie(options.stderr_path, STDERR_FILENO);
    }
    execv(argv[0], argv.data());
    _exit(127);
  }
  return std::unique_ptr<Subprocess>(new Subprocess(pid));
}

Subprocess::~Subprocess() {
  if (!status_.has_value()) {
    kill(pid_, SIGKILL);
    int status;
    waitpid(pid_, &status, 0);
  }
}

void Subprocess::Signal(int sig) {
  if (!status_.has_value()) kill(pid_, sig);
}

std::optional<int> Subprocess::Poll() {
  if (status_.has_value()) return status_;
  int status;
  if (waitpid(pid_, &status, WNOHANG) == pid_) status_ = DecodeWaitStatus(status);
  return status_;
}

std::optional<int> Subprocess::Wait(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!Poll().has_value()) {
    if (absl::Now() >= deadline) return std::nullopt;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return status_;
}

int Subprocess::Stop(absl::Duration grace) {
  Signal(SIGTERM);
  if (std::optional<int> s = Wait(grace)) return *s;
  Signal(SIGKILL);
  return *Wait(absl::InfiniteDuration());
}

std::string ThisExecutableDir() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return ".";
  const std::string path(buf, n);
  return path.substr(0, path.rfind('/'));
}

}  // namespace tessera
