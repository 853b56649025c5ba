#!/usr/bin/env bash
# Bandwidth cap (tc tbf, both directions) on worker 1's link for CAP_S seconds
# (default 60) in a synchronous Fashion-MNIST job. Samples the resident
# memory (process_resident_memory_bytes on /metrics) of both servers and both
# workers every SAMPLE_S seconds and checks the RELIABILITY.md figure
# "Bandwidth cap (tbf) on one worker for minutes: server and client memory
# grow <= 10% (backpressure, not buffering)", growth measured from the
# sample taken WARMUP_CAP_S seconds into the cap to the largest later one.
# Then removes the cap and checks that the run finishes.
#
# Usage: bandwidth.sh [BIN_DIR [SOURCE_DIR]]
#   env: RATE (20mbit), CAP_S (60), SAMPLE_S (5), WARMUP_CAP_S (10),
#        MAX_STEPS (1500), RUN_LIMIT_S (180), SUBNET (169.254.80),
#        CHAOS_KEEP_LOGS=DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 1 ] && CHAOS_BIN=$1
[ $# -ge 2 ] && CHAOS_SRC=$2
source "$here/lib.sh"

rate=${RATE:-20mbit}
cap_s=${CAP_S:-60}
sample_s=${SAMPLE_S:-5}
warmup_cap_s=${WARMUP_CAP_S:-10}
max_steps=${MAX_STEPS:-1500}
run_limit_s=${RUN_LIMIT_S:-180}
chaos_init bandwidth "${SUBNET:-169.254.80}"
chaos_hosts s0 s1 w0 w1
job="$CHAOS_SRC/examples/fashion_mnist_mlp.textproto"
flags=(--max_steps="$max_steps" --epochs=1000)

echo "== bandwidth: sync Fashion-MNIST, 2 servers, 2 workers, max_steps $max_steps;"
echo "   tbf $rate on worker 1's link (both directions) for ${cap_s}s"
chaos_start_servers "$job" "${flags[@]}"
chaos_start_worker w0 0 "$job" "${flags[@]}" --evaluate=false
chaos_start_worker w1 1 "$job" "${flags[@]}" --evaluate=false

deadline=$((SECONDS + 60))
until v=$(chaos_metric s0 tessera_shard_version) && [ -n "$v" ] && [ "${v%.*}" -gt 20 ]; do
  [ $SECONDS -gt $deadline ] && { chaos_fail "training never started"; chaos_dump_logs; chaos_finish; }
  sleep 0.2
done

samples="$CHAOS_WORK/memory.tsv"
mem() { chaos_metric "$1" process_resident_memory_bytes; }
sample() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(now_s)" "$1" "$(mem s0)" "$(mem s1)" "$(mem w0)" \
    "$(mem w1)" "$(chaos_metric s0 tessera_shard_version)" >> "$samples"
}
sample before
t_cap=$(now_s)
fault_rate w1 "$rate"
chaos_log "capped worker 1's link at $rate"
next=0
while pytrue "$(now_s) - $t_cap < $cap_s"; do
  if pytrue "$(now_s) - $t_cap >= $next"; then sample capped; next=$((next + sample_s)); fi
  if ! kill -0 "$(chaos_pid worker-1)" 2>/dev/null; then break; fi
  sleep 0.5
done
sample capped
fault_rate_clear w1
t_uncap=$(now_s)
chaos_log "cap removed"
rc0=0; chaos_wait worker-0 "$run_limit_s" || rc0=$?
rc1=0; chaos_wait worker-1 "$run_limit_s" || rc1=$?
sample after
v_end="$(chaos_servers_metric tessera_shard_version)"
chaos_stop_servers

echo
echo "-- resident memory (MiB, process_resident_memory_bytes) and shard 0's version;"
echo "   t relative to the start of the cap"
/usr/bin/python3 - "$samples" "$t_cap" "$warmup_cap_s" > "$CHAOS_WORK/table.txt" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
tc, warm = float(sys.argv[2]), float(sys.argv[3])
names = ["server 0", "server 1", "worker 0", "worker 1"]
def mib(x):
    try: return float(x) / 2**20
    except ValueError: return None
print("%7s %-7s %9s %9s %9s %9s %8s" % ("t", "phase", *names, "version"))
for r in rows:
    vals = [mib(x) for x in r[2:6]]
    print("%7.1f %-7s %s %8s" % (float(r[0]) - tc, r[1],
          " ".join("%9s" % ("-" if v is None else "%.1f" % v) for v in vals), r[6] or "-"))
capped = [r for r in rows if r[1] == "capped"]
base = next((r for r in capped if float(r[0]) - tc >= warm), None)
later = [r for r in capped if base is not None and float(r[0]) > float(base[0])]
out = []
worst = None
for i, n in enumerate(names):
    b = mib(base[2 + i]) if base else None
    vals = [mib(r[2 + i]) for r in later if mib(r[2 + i]) is not None]
    if b is None or not vals:
        out.append("%s=-" % n.replace(" ", ""))
        worst = float("inf")
        continue
    g = max(vals) / b - 1
    worst = g if worst is None else max(worst, g)
    out.append("%s=%+.1f%%" % (n.replace(" ", ""), 100 * g))
# Steps per second under the cap (shard 0's version).
vs = [(float(r[0]), float(r[6])) for r in capped if r[6]]
rate = (vs[-1][1] - vs[0][1]) / (vs[-1][0] - vs[0][0]) if len(vs) > 1 and vs[-1][0] > vs[0][0] else 0
print("VERDICT %s %.2f %s" % ("-" if worst is None else "%.2f" % (100 * worst), rate, ",".join(out)))
EOF
verdict_line=$(grep '^VERDICT' "$CHAOS_WORK/table.txt")
grep -v '^VERDICT' "$CHAOS_WORK/table.txt"
read -r _ worst steps_rate growth <<< "$verdict_line"
echo
echo "growth from ${warmup_cap_s}s into the cap to the largest later sample: $growth"
echo "steps/s under the cap: $steps_rate; workers exit $rc0 $rc1; shard versions at the end: $v_end; servers exit on SIGTERM: $CHAOS_SERVER_RCS"
echo
chaos_expect "memory growth <= 10% under the tbf cap after warm-up (figure): worst $worst% ($growth)" \
  '[ "$worst" != - ] && pytrue "$worst <= 10"'
chaos_expect "training went on under the cap ($steps_rate steps/s)" 'pytrue "$steps_rate > 0"'
chaos_expect "the run finishes after the cap is removed (workers exit $rc0 $rc1, versions $v_end)" \
  '[ "$rc0 $rc1" = "0 0" ] && [ "$v_end" = "$max_steps $max_steps" ]'
chaos_expect "servers exit 0 on SIGTERM ($CHAOS_SERVER_RCS)" '[ "$CHAOS_SERVER_RCS" = "0 0" ]'
[ "$CHAOS_FAILED" = 0 ] || chaos_dump_logs 12
chaos_finish
