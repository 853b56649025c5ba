#!/usr/bin/env bash
# Scaling under bandwidth caps: synchronous Fashion-MNIST with 1, 2 and 4
# workers, each worker in its own network namespace whose link is capped with
# tc tbf (both directions), 2 servers in namespaces of their own (uncapped).
# For every cap and worker count it prints samples/s (worker 0's summary,
# all workers' samples), the ratio to 1 worker under the same cap, and the
# bytes a worker sends per step; the last line is a JSON document.
#
# On a link-bound cluster each worker brings its own link, so throughput
# should grow with the workers until the servers' CPU or links saturate; on
# this 2-core machine every process also shares the cores, which caps the
# uncapped row. BF16 on the wire halves the push bytes; its rows show what
# that buys when the link is the bottleneck.
#
# Usage (root, from the repository root):
#   bench/scaling_netns.sh [BIN_DIR] [--out=FILE]
#   env: RATES ("none 1gbit 200mbit"), WORKERS ("1 2 4"), MAX_STEPS (150),
#        BF16_RATE (200mbit; "" for none), RUN_LIMIT_S (180 per run)
# Exits 77 when network namespaces are not available (not root, no iproute2).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=""
for a in "$@"; do
  case $a in
    --out=*) out=${a#--out=} ;;
    --help|-h) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "scaling_netns.sh: unknown option '$a'" >&2; exit 2 ;;
    *) CHAOS_BIN=$a ;;
  esac
done
CHAOS_SRC=$(cd "$here/.." && pwd)
source "$CHAOS_SRC/tests/chaos/lib.sh"

rates=${RATES:-none 1gbit 200mbit}
workers_list=${WORKERS:-1 2 4}
max_steps=${MAX_STEPS:-150}
bf16_rate=${BF16_RATE-200mbit}
run_limit_s=${RUN_LIMIT_S:-180}
chaos_init scaling "${SUBNET:-169.254.81}"
chaos_hosts s0 s1 w0 w1 w2 w3
job="$CHAOS_SRC/examples/fashion_mnist_mlp.textproto"

docs=()
declare -A base=()
run_one() {  # rate workers wire_dtype
  local rate=$1 w=$2 dtype=$3 r rc rcs="" t0
  local flags=(--max_steps="$max_steps" --epochs=1000 --num_workers="$w" --wire_dtype="$dtype")
  chaos_start_servers "$job" "${flags[@]}"
  for ((r = 0; r < w; r++)); do
    [ "$rate" != none ] && fault_rate "w$r" "$rate"
    chaos_start_worker "w$r" "$r" "$job" "${flags[@]}" --evaluate=false
  done
  t0=$SECONDS
  for ((r = 0; r < w; r++)); do
    rc=0; chaos_wait "worker-$r" $((run_limit_s - (SECONDS - t0))) || rc=$?
    if [ "$rc" = 124 ]; then kill -9 "$(chaos_pid "worker-$r")" 2>/dev/null || true; fi
    rcs+="${rcs:+ }$rc"
  done
  local sps bytes
  sps=$(chaos_summary 0 samples_per_sec)
  bytes=$(chaos_summary 0 payload_bytes_per_step)
  chaos_stop_servers 10
  for ((r = 0; r < w; r++)); do fault_rate_clear "w$r"; done
  chaos_archive "run-$rate-$w-$dtype"
  local key="$rate/$dtype" ratio="null"
  if [ -n "$sps" ] && [ "$rcs" = "$(printf '0%.0s ' $(seq "$w") | sed 's/ $//')" ]; then
    [ "$w" = 1 ] && base[$key]=$sps
    [ -n "${base[$key]:-}" ] && ratio=$(pyval "round($sps / ${base[$key]}, 3)")
    printf '%-8s %-4s workers %d: %9.0f samples/s  x1 worker %-6s  %s payload bytes per worker step (push + pull)\n' \
      "$rate" "$dtype" "$w" "$sps" "$ratio" "$bytes"
  else
    echo "$rate $dtype workers $w: FAILED (worker exits: $rcs)"
    sps=null
  fi
  docs+=("{\"rate\": \"$rate\", \"wire_dtype\": \"$dtype\", \"workers\": $w, \"samples_per_sec\": ${sps:-null}, \"ratio_to_1_worker\": $ratio, \"payload_bytes_per_step\": ${bytes:-null}, \"worker_exit_codes\": \"$rcs\"}")
}

echo "== scaling under bandwidth caps: sync Fashion-MNIST, 2 servers, ${max_steps} steps per run;"
echo "   tbf cap on every worker's link (both directions); servers' links uncapped"
for rate in $rates; do
  for w in $workers_list; do run_one "$rate" "$w" F32; done
done
if [ -n "$bf16_rate" ]; then
  for w in $workers_list; do run_one "$bf16_rate" "$w" BF16; done
fi
doc="{\"benchmark\": \"scaling_netns\", \"max_steps\": $max_steps, \"runs\": [$(IFS=,; echo "${docs[*]}")]}"
if [ -n "$out" ]; then echo "$doc" > "$out"; fi
echo "$doc"
