#!/usr/bin/env bash
# Runs the network-fault scenarios one after another (never two at once: they
# share the CPU and their throughput figures would mix) and prints a summary:
# one line per scenario and every PASS/FAIL line it printed.
#
# Usage: run_all.sh [BIN_DIR [SCENARIO...]]
#   SCENARIO: quick_partition partition loss bandwidth exact_sum freeze
#             async_worker_restart sigterm_under_load straggler (default: all)
# Exit 0 when no scenario failed (skipped ones don't fail the run).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../.." && pwd)
bin=${1:-$src/build/bin}
shift || true
scenarios=("$@")
[ ${#scenarios[@]} = 0 ] && scenarios=(quick_partition partition loss bandwidth exact_sum freeze
  async_worker_restart sigterm_under_load straggler)

logs=$(mktemp -d /tmp/tessera-chaos-XXXXXX)
declare -A result secs
passed=0 failed=0 skipped=0
for s in "${scenarios[@]}"; do
  if [ ! -f "$here/$s.sh" ]; then
    echo "no scenario '$s' (tests/chaos/$s.sh)"; result[$s]=FAILED; failed=$((failed + 1)); continue
  fi
  echo "=============== $s"
  start=$SECONDS
  bash "$here/$s.sh" "$bin" "$src" 2>&1 | tee "$logs/$s.log"
  rc=${PIPESTATUS[0]}
  secs[$s]=$((SECONDS - start))
  case $rc in
    0) result[$s]=passed; passed=$((passed + 1)) ;;
    77) result[$s]=skipped; skipped=$((skipped + 1)) ;;
    *) result[$s]=FAILED; failed=$((failed + 1)) ;;
  esac
done

echo
echo "=============== chaos summary"
for s in "${scenarios[@]}"; do
  printf '%-16s %-8s %5ss\n' "$s" "${result[$s]}" "${secs[$s]:-0}"
  grep -E '^(PASS|FAIL|SKIP)' "$logs/$s.log" 2>/dev/null | sed 's/^/    /'
done
rm -rf "$logs"
echo "chaos: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
