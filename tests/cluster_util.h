// Helpers for tests that start the real binaries on 127.0.0.1.

#ifndef TESSERA_TESTS_CLUSTER_UTIL_H_
#define TESSERA_TESTS_CLUSTER_UTIL_H_

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/subprocess.h"
#include "gtest/gtest.h"

namespace tessera {
namespace testing_util {

inline std::string BinDir() { return TESSERA_BIN_DIR; }

// A port on 127.0.0.1 that was free a moment ago (bound to 0, released),
// for processes that must be restarted on the same address.
inline int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}
inline std::string SourceDir() { return TESSERA_SOURCE_DIR; }
inline std::string Bin(const std::string& name) { return BinDir() + "/" + name; }

inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

inline void WriteFile(const std::string& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary);
  out << content;
}

// A fresh folder under the test temp dir.
// Folders made by NewTempDir in this process.
inline std::vector<std::string>& TempDirs() {
  static auto* dirs = new std::vector<std::string>();
  return *dirs;
}

// At exit: removes the folders when every test passed (or always, when
// TESSERA_KEEP_TEST_DIRS is unset and nothing failed); otherwise says where
// they are, for the logs of the failed run.
inline void RemoveTempDirsAtExit() {
  const bool passed = ::testing::UnitTest::GetInstance()->Passed();
  if (!passed || std::getenv("TESSERA_KEEP_TEST_DIRS") != nullptr) {
    for (const std::string& d : TempDirs()) std::cerr << "kept " << d << std::endl;
    return;
  }
  std::error_code ignored;
  for (const std::string& d : TempDirs()) std::filesystem::remove_all(d, ignored);
}

// A new empty folder under the test temp folder, removed when the test
// binary exits after every test passed.
inline std::string NewTempDir(const std::string& name) {
  std::string dir = absl::StrCat(::testing::TempDir(), "/", name, "-XXXXXX");
  if (mkdtemp(dir.data()) == nullptr) ADD_FAILURE() << "mkdtemp failed";
  if (TempDirs().empty()) std::atexit(RemoveTempDirsAtExit);
  TempDirs().push_back(dir);
  return dir;
}

struct RunResult {
  int status = -1;
  std::string output;  // stdout and stderr together
};

// Runs a program to completion (killing it after `timeout`) with its output
// captured in `dir`.
inline RunResult RunProgram(const std::vector<std::string>& argv, const std::string& dir,
                     absl::Duration timeout) {
  static int counter = 0;
  const std::string log = absl::StrCat(dir, "/run-", counter++, ".log");
  SpawnOptions opt;
  opt.argv = argv;
  opt.stdout_path = opt.stderr_path = log;
  RunResult r;
  auto p = Subprocess::Spawn(opt);
  if (!p.ok()) {
    ADD_FAILURE() << p.status();
    return r;
  }
  std::optional<int> status = (*p)->Wait(timeout);
  if (!status.has_value()) {
    ADD_FAILURE() << argv[0] << " did not finish within " << absl::FormatDuration(timeout);
    status = (*p)->Stop(absl::Seconds(2));
  }
  r.status = *status;
  r.output = ReadFile(log);
  return r;
}

// A server started on 127.0.0.1 with an ephemeral port, stopped (and
// reaped) when this object dies.
class ServerProcess {
 public:
  static std::unique_ptr<ServerProcess> Start(const std::string& dir,
                                              const std::vector<std::string>& extra) {
    auto s = std::unique_ptr<ServerProcess>(new ServerProcess());
    static int counter = 0;
    const int id = counter++;
    const std::string port_file = absl::StrCat(dir, "/server-", id, ".port");
    s->log_ = absl::StrCat(dir, "/server-", id, ".log");
    SpawnOptions opt;
    opt.argv = {Bin("tessera-server"), "--listen=127.0.0.1:0",
                absl::StrCat("--port_file=", port_file)};
    opt.argv.insert(opt.argv.end(), extra.begin(), extra.end());
    opt.stdout_path = opt.stderr_path = s->log_;
    auto p = Subprocess::Spawn(opt);
    if (!p.ok()) {
      ADD_FAILURE() << p.status();
      return nullptr;
    }
    s->process_ = *std::move(p);
    const absl::Time deadline = absl::Now() + absl::Seconds(20);
    while (absl::Now() < deadline) {
      std::ifstream in(port_file);
      if (in >> s->port_ && s->port_ > 0) return s;
      if (s->process_->Poll().has_value()) break;
      absl::SleepFor(absl::Milliseconds(10));
    }
    ADD_FAILURE() << "server did not start:\n" << ReadFile(s->log_);
    return nullptr;
  }

  int port() const { return port_; }
  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }
  Subprocess* process() { return process_.get(); }
  std::string log() const { return ReadFile(log_); }

 private:
  ServerProcess() = default;
  std::unique_ptr<Subprocess> process_;
  std::string log_;
  int port_ = 0;
};

}  // namespace testing_util
}  // namespace tessera

#endif  // TESSERA_TESTS_CLUSTER_UTIL_H_
