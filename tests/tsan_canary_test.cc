// A deliberately racy program that ThreadSanitizer must flag.
//
// The TSan build runs with a suppression file (tools/sanitize/tsan.supp) that
// silences races inside Debian's uninstrumented gRPC and Abseil. This test
// proves the file is narrow: it runs the racy test below in a child process
// under the same suppressions and expects a data-race report that points at
// this file. Outside a TSan build it skips.

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "gtest/gtest.h"

#if defined(__SANITIZE_THREAD__)
#define TESSERA_TSAN_BUILD 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define TESSERA_TSAN_BUILD 1
#endif
#endif

namespace tessera {
namespace {

// Not inlined, so the report's top frame is a function of this file.
__attribute__((noinline)) void IncrementUnsynchronised(int* counter, int times) {
  for (int i = 0; i < times; ++i) ++*counter;
}

// The race itself: two threads increment one plain int with no lock and no
// atomics. Disabled, so that it runs only when the test below asks for it.
TEST(TsanCanary, DISABLED_PlainIntIncrementedByTwoThreads) {
  int* counter = new int(0);
  std::thread a(IncrementUnsynchronised, counter, 100000);
  std::thread b(IncrementUnsynchronised, counter, 100000);
  a.join();
  b.join();
  std::printf("counter = %d\n", *counter);
  delete counter;
}

TEST(TsanCanary, SuppressionsStillReportApplicationRaces) {
#ifndef TESSERA_TSAN_BUILD
  GTEST_SKIP() << "not a ThreadSanitizer build (make tsan)";
#else
  // The child reports to stderr whatever the parent's options say, uses the
  // project's suppressions, and exits non-zero on the first report.
  const std::string options =
      std::string("suppressions=") + TESSERA_TSAN_SUPPRESSIONS +
      " halt_on_error=1 exitcode=66 log_path=stderr second_deadlock_stack=1";
  ASSERT_EQ(setenv("TSAN_OPTIONS", options.c_str(), /*overwrite=*/1), 0);
  // popen runs the command through /bin/sh, so resolve this binary's path
  // here rather than naming /proc/self/exe in the command.
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  ASSERT_GT(n, 0);
  self[n] = '\0';
  const std::string command =
      std::string("'") + self +
      "' --gtest_also_run_disabled_tests"
      " --gtest_filter=TsanCanary.DISABLED_PlainIntIncrementedByTwoThreads 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char buffer[4096];
  size_t got;
  while ((got = fread(buffer, 1, sizeof(buffer), pipe)) > 0) output.append(buffer, got);
  const int status = pclose(pipe);
  ASSERT_TRUE(WIFEXITED(status)) << output;
  EXPECT_EQ(WEXITSTATUS(status), 66) << output;
  EXPECT_NE(output.find("WARNING: ThreadSanitizer: data race"), std::string::npos) << output;
  // The race is reported in this file, not somewhere a suppression would
  // have hidden it.
  EXPECT_NE(output.find("tsan_canary_test.cc"), std::string::npos) << output;
  EXPECT_NE(output.find("IncrementUnsynchronised"), std::string::npos) << output;
#endif
}

}  // namespace
}  // namespace tessera
