// Stops a Tessera binary that was compiled for a newer x86-64 level than
// the CPU it runs on, with a message that names the missing instruction set
// and the build option, instead of dying of SIGILL somewhere later.
//
// The check has to run before any instruction of that level can: this file
// alone is compiled for the baseline x86-64 (see common/CMakeLists.txt), and
// the check is a constructor of priority 101, which runs before the
// executable's other static constructors. It is linked into tessera,
// tessera-server and tessera-worker as an object library, so no archive can
// drop it.
//
// TESSERA_CPU_LEVEL (3 for x86-64-v3, 4 for x86-64-v4) and TESSERA_MARCH_NAME
// come from CMake; other -march values (native, a CPU name) get no check.
// TESSERA_TEST_CPU_LACKS=<feature> makes the check treat that feature as
// missing, so that tests can see the message on any CPU.

#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(TESSERA_CPU_LEVEL) && TESSERA_CPU_LEVEL >= 3

namespace {

bool Lacks(const char* feature, bool supported) {
  const char* pretend = std::getenv("TESSERA_TEST_CPU_LACKS");
  return !supported || (pretend != nullptr && std::strcmp(pretend, feature) == 0);
}

[[gnu::constructor(101)]] void CheckCpuLevel() {
  __builtin_cpu_init();
  // __builtin_cpu_supports takes string literals only, hence the macro.
#define TESSERA_FEATURE(name) \
  { name, static_cast<bool>(__builtin_cpu_supports(name)) }
  const struct {
    const char* name;
    bool supported;
  } features[] = {
    TESSERA_FEATURE("avx2"),
    TESSERA_FEATURE("fma"),
    TESSERA_FEATURE("bmi2"),
#if TESSERA_CPU_LEVEL >= 4
    TESSERA_FEATURE("avx512f"),
    TESSERA_FEATURE("avx512bw"),
    TESSERA_FEATURE("avx512cd"),
    TESSERA_FEATURE("avx512dq"),
    TESSERA_FEATURE("avx512vl"),
#endif
  };
#undef TESSERA_FEATURE
  for (const auto& f : features) {
    if (!Lacks(f.name, f.supported)) continue;
    std::fprintf(stderr,
                 "error: this Tessera build was compiled for %s, and this CPU lacks %s; "
                 "build it here with the default -DTESSERA_MARCH=auto, or with "
                 "-DTESSERA_MARCH=x86-64-v3 (or an older level) to run on older CPUs\n",
                 TESSERA_MARCH_NAME, f.name);
    std::_Exit(1);
  }
}

}  // namespace

#endif
