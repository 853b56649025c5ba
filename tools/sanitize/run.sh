#!/usr/bin/env bash
# Sanitizer builds and runs, each in a build folder of its own:
#
#   tools/sanitize/run.sh asan            build-asan/: ASan + UBSan, ctest -LE gpu
#   tools/sanitize/run.sh tsan            build-tsan/: TSan with tools/sanitize/tsan.supp
#   tools/sanitize/run.sh fuzz [TARGET..] build-fuzz/: libFuzzer, each target FUZZ_SECONDS
#   tools/sanitize/run.sh thread-safety   build-tsa/: every target built with clang++-14,
#                                         -Wthread-safety and -Wunused-result errors
#                                         (locking annotations and must-use results
#                                         checked; nothing is run)
#
# (`make asan`, `make tsan`, `make fuzz`, `make thread-safety` call this.) Environment:
#   JOBS          build parallelism (default: nproc)
#   CTEST_FLAGS   extra ctest arguments (asan, tsan), e.g. "-R shard_store"
#   TSAN_EXCLUDE  ctest -E regex of tests left out under TSan (default none)
#   TSAN_GTEST_FILTER  GTEST_FILTER for the TSan run (default none)
#   ASAN_EXCLUDE  ctest -E regex of tests left out under ASan (default none)
#   FUZZ_SECONDS  seconds per fuzz target (default 60)
#   CXX           compiler for asan/tsan (default: CMake's choice, g++);
#                 fuzz always uses clang++-14
#
# Every sanitizer report of every process, including the servers and
# workers that process-level tests start, goes to a log file under
# BUILD/sanitizer-logs/; the run fails when any appears, even if the test
# that caused it passed.
set -euo pipefail

mode=${1:-}
[ $# -gt 0 ] && shift
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
jobs=${JOBS:-$(nproc)}

# Nothing is left out by default. (FaultTest.ServerKilledAndRestartedFromCheckpoint
# used to be, when it bounded the whole job's time after the restart; it now
# bounds the recovery itself, which takes 1-2 s under either sanitizer.)
TSAN_EXCLUDE=${TSAN_EXCLUDE-}
TSAN_GTEST_FILTER=${TSAN_GTEST_FILTER-}
ASAN_EXCLUDE=${ASAN_EXCLUDE-}

configure() {
  local dir=$1
  shift
  cmake -S "$root" -B "$dir" -G Ninja -DTESSERA_WITH_CUDA=OFF "$@" >/dev/null
}

# Prints the sanitizer logs in $1 and returns non-zero when there are any.
report_logs() {
  local logs=$1
  local files
  files=$(find "$logs" -type f 2>/dev/null | sort)
  if [ -z "$files" ]; then
    echo "sanitizer logs: none (no process reported anything)"
    return 0
  fi
  echo "sanitizer logs: $(echo "$files" | wc -l) file(s) in $logs"
  local f
  for f in $files; do
    echo "=== $f"
    head -c 20000 "$f"
  done
  return 1
}

run_ctest() {
  local dir=$1
  shift
  # The chaos scripts train to MAX_STEPS (1500 by default, far past their
  # deadlines in a sanitizer build); 300 steps still outlast the partition.
  export MAX_STEPS=${MAX_STEPS:-300}
  local logs=$dir/sanitizer-logs
  rm -rf "$logs"
  mkdir -p "$logs"
  local rc=0
  (cd "$dir" && ctest --output-on-failure -LE gpu "$@" ${CTEST_FLAGS:-}) || rc=$?
  report_logs "$logs" || rc=1
  return $rc
}

case "$mode" in
  asan)
    dir=$root/build-asan
    configure "$dir" -DTESSERA_SANITIZE=address ${CXX:+-DCMAKE_CXX_COMPILER=$CXX}
    cmake --build "$dir" -j "$jobs"
    logs=$dir/sanitizer-logs
    export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1 halt_on_error=1 strict_string_checks=1 check_initialization_order=1 log_path=$logs/asan}"
    export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1 halt_on_error=1 log_path=$logs/ubsan}"
    export LSAN_OPTIONS="${LSAN_OPTIONS:-suppressions=$root/tools/sanitize/lsan.supp print_suppressions=0}"
    if [ -n "$ASAN_EXCLUDE" ]; then
      echo "left out under ASan: $ASAN_EXCLUDE"
      run_ctest "$dir" -E "$ASAN_EXCLUDE"
    else
      run_ctest "$dir"
    fi
    ;;
  tsan)
    dir=$root/build-tsan
    configure "$dir" -DTESSERA_SANITIZE=thread ${CXX:+-DCMAKE_CXX_COMPILER=$CXX}
    cmake --build "$dir" -j "$jobs"
    logs=$dir/sanitizer-logs
    # report_signal_unsafe=0: gRPC's signal handling calls malloc, which
    # TSan would report as a signal-unsafe call in an uninstrumented library.
    export TSAN_OPTIONS="${TSAN_OPTIONS:-suppressions=$root/tools/sanitize/tsan.supp halt_on_error=1 second_deadlock_stack=1 report_signal_unsafe=0 log_path=$logs/tsan}"
    # GoogleTest reads GTEST_FILTER from the environment (a test's own
    # --gtest_filter, as the canary's child uses, still wins).
    if [ -n "$TSAN_GTEST_FILTER" ]; then
      echo "GoogleTest filter under TSan: $TSAN_GTEST_FILTER"
      export GTEST_FILTER="$TSAN_GTEST_FILTER"
    fi
    if [ -n "$TSAN_EXCLUDE" ]; then
      echo "left out under TSan: $TSAN_EXCLUDE"
      run_ctest "$dir" -E "$TSAN_EXCLUDE"
    else
      run_ctest "$dir"
    fi
    ;;
  fuzz)
    dir=$root/build-fuzz
    configure "$dir" -DTESSERA_SANITIZE=fuzzer -DCMAKE_CXX_COMPILER=clang++-14
    cmake --build "$dir" -j "$jobs" --target fuzz_all
    out=$dir/fuzz
    rm -rf "$out/seeds"
    "$out/make_seeds" "$out/seeds"
    seconds=${FUZZ_SECONDS:-60}
    if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets <"$out/targets.txt"; fi
    mkdir -p "$out/crashes" "$out/logs"
    # The file targets write every input to a scratch file: keep it in memory.
    if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then export TMPDIR=/dev/shm; fi
    export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}"
    export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1}"
    failed=0
    summary=""
    for t in "${targets[@]}"; do
      [ -n "$t" ] || continue
      corpus=$out/corpus/$t
      mkdir -p "$corpus"
      rm -f "$out/crashes/$t-"*
      args=(-max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1
            -artifact_prefix="$out/crashes/$t-")
      [ -f "$root/fuzz/$t.dict" ] && args+=(-dict="$root/fuzz/$t.dict")
      dirs=("$corpus")
      [ -d "$out/seeds/$t" ] && dirs+=("$out/seeds/$t")
      [ -d "$root/fuzz/corpus/$t" ] && dirs+=("$root/fuzz/corpus/$t")
      echo "--- $t: ${seconds}s"
      rc=0
      (cd "$out" && "$out/$t" "${args[@]}" "${dirs[@]}") >"$out/logs/$t.log" 2>&1 || rc=$?
      execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/logs/$t.log" | tail -1)
      crashes=$(find "$out/crashes" -name "$t-*" -type f | wc -l)
      units=$(find "$corpus" -type f | wc -l)
      line="$t: ${execs:-?} executions, $crashes crash(es), corpus $units inputs, exit $rc"
      echo "$line"
      summary+="$line"$'\n'
      if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        failed=1
        echo "    log: $out/logs/$t.log"
        grep -E "ERROR: |runtime error|invariant violated|SUMMARY" "$out/logs/$t.log" | head -5 | sed 's/^/    /'
        find "$out/crashes" -name "$t-*" -type f | sed 's/^/    input: /'
      fi
    done
    echo "=== fuzz summary (${seconds}s each)"
    printf '%s' "$summary"
    exit $failed
    ;;
  thread-safety)
    # ABSL_GUARDED_BY, ABSL_EXCLUSIVE_LOCKS_REQUIRED and friends are
    # attributes only clang checks (CMakeLists.txt adds -Wthread-safety for
    # clang); g++, which builds everything else, ignores them. The same goes
    # for ABSL_MUST_USE_RESULT (absl::Status, SimpleAtoi...): an ignored
    # result is an error here too.
    dir=$root/build-tsa
    configure "$dir" -DCMAKE_CXX_COMPILER=clang++-14 \
      -DCMAKE_CXX_FLAGS="-Werror=thread-safety -Werror=unused-result"
    cmake --build "$dir" -j "$jobs"
    echo "thread-safety analysis: every target compiled with clang++-14" \
      "-Werror=thread-safety -Werror=unused-result"
    ;;
  *)
    echo "usage: $0 asan|tsan|fuzz [FUZZ_TARGET...]|thread-safety" >&2
    exit 2
    ;;
esac
