#!/usr/bin/env bash
# Server frozen: shard 1's server is stopped with SIGSTOP for FREEZE_S
# seconds (default 30) in a synchronous Fashion-MNIST job, then continued
# with SIGCONT. Checks the RELIABILITY.md figures "Server frozen (kill -STOP
# 30 s): clients notice within keepalive time + timeout; progress resumes
# <= 5 s after -CONT; 0 double applies", and that no process exits during the
# freeze, the run finishes and every process exits 0.
#
# A frozen process still has a kernel: its TCP connections stay up and even
# accept new ones (into the listen backlog), so the workers can only notice
# through gRPC keepalive (client pings every 10 s, 5 s ping timeout: notice
# within 15 s). "Notice" = the worker's first "...; retrying" line about
# shard 1 after the SIGSTOP (the worker logs the first failed call of each
# outage; chaos_spawn stamps each line with the epoch time); bar 15 s + 1 s.
# "Progress resumes" = the first sample after SIGCONT in which both shards'
# versions (tessera_shard_version) are past V, the version shard 0 held
# during the freeze (shard 1 then held V or V - 1): a whole step completed on
# both shards. Samples come every ~0.4 s and are stamped when their scrapes
# are done, so the figure errs late, never early.
#
# Double applies, per shard: applied = tessera_pushes_total{outcome=
# "applied"}, i.e. contributions accepted into the step in progress;
# acknowledged = the steps each worker completed (summary "steps"; every
# completed step is one push acknowledged by every shard). A push is
# acknowledged either as applied or, with applied=false, as a repeat of an
# earlier applied push whose reply was lost (R) or as a contribution to a
# step that had already closed without that worker (C, never applied).
# So applied - acknowledged = D - C, D = double applies, and D lies in
# [applied - acknowledged, applied - acknowledged + N], where N = R + C is the
# workers' not-applied acknowledgements (summary duplicate_acks, summed over
# the shards). With real gradients R and C cannot be told apart, so D is
# exact (0) only when N = 0; otherwise the check is the lower bound
# applied - acknowledged <= 0 together with applied <= workers x version (a
# step holds at most one contribution per worker), and the script prints the
# upper bound. (tests/chaos/exact_sum.sh counts D exactly with synthetic
# gradients.)
#
# Also checked, as the "exact update count" of the network-fault figures:
# both workers stay alive and take part in every step, so each completed
# step on a shard must hold both workers' gradients: applied = 2 x version
# (version = completed steps; applied = 2 x version - S + D, S = gradients
# missing from steps that completed short-handed). A shortfall means a step
# was closed without a live worker, whose resent push was then acknowledged
# with applied=false ("step N is closed"): an acknowledged gradient that
# shard never applied.
#
# Usage: freeze.sh [BIN_DIR [SOURCE_DIR]]
#   env: FREEZE_S (30), MAX_STEPS (6000), WARMUP_S (5), RUN_LIMIT_S (150 after
#        the SIGCONT), SUBNET (169.254.84), CHAOS_KEEP_LOGS=DIR.
# Exit 0 all passed, 1 a figure failed, 77 namespaces/iptables unavailable.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 1 ] && CHAOS_BIN=$1
[ $# -ge 2 ] && CHAOS_SRC=$2
source "$here/lib.sh"

freeze_s=${FREEZE_S:-30}
max_steps=${MAX_STEPS:-6000}
warmup_s=${WARMUP_S:-5}
run_limit_s=${RUN_LIMIT_S:-150}
keepalive_s=10
keepalive_timeout_s=5
chaos_init freeze "${SUBNET:-169.254.84}"
chaos_hosts s0 s1 w0 w1
job="$CHAOS_SRC/examples/fashion_mnist_mlp.textproto"
flags=(--max_steps="$max_steps" --epochs=1000)

echo "== freeze: sync Fashion-MNIST, 2 servers, 2 workers, max_steps $max_steps;"
echo "   shard 1's server stopped (SIGSTOP) for ${freeze_s}s after ${warmup_s}s of training, then SIGCONT"
chaos_start_servers "$job" "${flags[@]}"
chaos_start_worker w0 0 "$job" "${flags[@]}" --evaluate=false
chaos_start_worker w1 1 "$job" "${flags[@]}" --evaluate=false
s1_pid=$(chaos_pid server-1)
# Never leave a stopped process behind: the EXIT trap's SIGKILL ends a
# stopped process too, but continue it first in case the script dies between
# the STOP and the CONT.
trap 'kill -CONT "$s1_pid" 2>/dev/null || true; chaos_cleanup' EXIT


samples="$CHAOS_WORK/samples.tsv"
# Each row is stamped when its scrapes are done (so a "moved by then" is
# never dated before it was seen).
sample() {  # phase: t phase v0 v1 live0 live1 w0step w1step
  local row
  row=$(printf '%s\t%s\t%s\t%s\t%s\t%s\t%s' "$1" \
    "$(chaos_metric s0 tessera_shard_version)" "$(chaos_metric s1 tessera_shard_version)" \
    "$(chaos_metric s0 tessera_shard_live_workers)" "$(chaos_metric s1 tessera_shard_live_workers)" \
    "$(chaos_metric w0 tessera_worker_step)" "$(chaos_metric w1 tessera_worker_step)")
  printf '%s\t%s\n' "$(now_s)" "$row" >> "$samples"
}

deadline=$((SECONDS + 60))
until v=$(chaos_metric s0 tessera_shard_version) && [ -n "$v" ] && [ "${v%.*}" -gt 0 ]; do
  [ $SECONDS -gt $deadline ] && { chaos_fail "training never started"; chaos_dump_logs; chaos_finish; }
  sleep 0.2
done
t_start=$(now_s)
while pytrue "$(now_s) - $t_start < $warmup_s"; do sample warmup; sleep 0.3; done

# While shard 1 is stopped its /metrics does not answer either: each scrape
# of it waits for curl's 2 s limit, so the frozen phase samples only the others.
sample_frozen() {
  local row
  row=$(printf '%s\t%s\t%s\t%s\t%s\t%s\t%s' "$1" \
    "$(chaos_metric s0 tessera_shard_version)" "" \
    "$(chaos_metric s0 tessera_shard_live_workers)" "" \
    "$(chaos_metric w0 tessera_worker_step)" "$(chaos_metric w1 tessera_worker_step)")
  printf '%s\t%s\n' "$(now_s)" "$row" >> "$samples"
}
v1_before=$(chaos_metric s1 tessera_shard_version)
t_stop=$(now_s)
kill -STOP "$s1_pid"
chaos_log "shard 1's server stopped (SIGSTOP, pid $s1_pid)"
while pytrue "$(now_s) - $t_stop < $freeze_s"; do sample_frozen frozen; sleep 0.3; done
exited_during=""
for p in server-0 server-1 worker-0 worker-1; do chaos_alive "$p" || exited_during+=" $p"; done
s1_state=$(ps -o stat= -p "$s1_pid" | cut -c1)
kill -CONT "$s1_pid"
t_cont=$(now_s)
chaos_log "shard 1's server continued (SIGCONT; it was in state '$s1_state')"

chaos_wait_workers "$run_limit_s" 0.3 sample continued
declare -A ver applied dup rej
for s in 0 1; do
  ver[$s]=$(chaos_metric "s$s" tessera_shard_version)
  applied[$s]=$(chaos_metric "s$s" tessera_pushes_total 'outcome="applied"')
  dup[$s]=$(chaos_metric "s$s" tessera_pushes_total 'outcome="duplicate"')
  rej[$s]=$(chaos_metric "s$s" tessera_pushes_total 'outcome="rejected"')
done
chaos_stop_servers

echo
echo "-- timeline (t relative to the SIGSTOP; v0/v1 = tessera_shard_version of shards 0/1,"
echo "   live0/live1 = tessera_shard_live_workers, w0/w1 = tessera_worker_step; shard 1 is not"
echo "   scraped while stopped)"
/usr/bin/python3 - "$samples" "$t_stop" "$t_cont" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
ts, tc = float(sys.argv[2]), float(sys.argv[3])
print("%8s %-9s %6s %6s %5s %5s %6s %6s" % ("t", "phase", "v0", "v1", "live0", "live1", "w0", "w1"))
prev = None
for i, r in enumerate(rows):
    t = float(r[0])
    key = tuple(r[2:])
    near = -1.5 <= t - ts <= 2 or -1 <= t - tc <= 8
    # Around the STOP and the CONT every row; elsewhere only rows that changed,
    # and every 6th at most.
    if near or i == len(rows) - 1 or (key != prev and i % 6 == 0):
        print("%8.1f %-9s %6s %6s %5s %5s %6s %6s" % ((t - ts,) + tuple(x or "-" for x in r[1:8])))
    prev = key
EOF

echo
echo "-- worker and server log lines about the fault (t relative to the SIGSTOP)"
for f in worker-0 worker-1 server-0 server-1; do
  chaos_grep "$f" 'retrying|reconnected|gave up|rror|failed|stopping|fast-forward' | head -12 |
    while read -r ts rest; do
      printf '%8.1f %s: %s\n' "$(pyval "$ts - $t_stop")" "$f" "${rest:0:220}"
    done
done

# Figures from the logs and the samples.
read -r notice0 notice1 resume_s v_frozen v1_first < <(/usr/bin/python3 - "$CHAOS_WORK" "$t_stop" \
  "$t_cont" "$samples" <<'EOF'
import sys
work, ts, tc, samples = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
def first(name, word, after, before=None):
    try:
        for l in open(f"{work}/{name}.log", errors="replace"):
            t, _, rest = l.partition(" ")
            try: t = float(t)
            except ValueError: continue
            if all(w in rest for w in word) and t >= after and (before is None or t <= before):
                return t
    except OSError:
        pass
    return None
n = [first(f"worker-{w}", ("shard 1 (", "retrying"), ts) for w in (0, 1)]
def num(x):
    try: return float(x)
    except ValueError: return None
rows = [l.rstrip("\n").split("\t") for l in open(samples)]
before = [r for r in rows if float(r[0]) <= tc]
after = [r for r in rows if float(r[0]) > tc]
# While shard 1 is stopped the workers cannot finish their step on it, so
# shard 0 stops at some version V (the step after the one shard 1 holds) and
# shard 1 is at V or V - 1. Progress has resumed once both shards are past V:
# a whole step completed on both after the SIGCONT.
v_frozen = next((num(r[2]) for r in reversed(before) if num(r[2]) is not None), None)
v1_first = next((num(r[3]) for r in after if num(r[3]) is not None), None)
resume = None
for r in after:
    t, v0, v1 = float(r[0]) - tc, num(r[2]), num(r[3])
    if None not in (v0, v1, v_frozen) and v0 > v_frozen and v1 > v_frozen:
        resume = t
        break
f = lambda x: "-" if x is None else "%.1f" % x
print(f(None if n[0] is None else n[0] - ts), f(None if n[1] is None else n[1] - ts), f(resume),
      f(v_frozen), f(v1_first))
EOF
)
steps0=$(chaos_summary 0 steps); steps1=$(chaos_summary 1 steps)
dacks0=$(chaos_summary 0 duplicate_acks); dacks1=$(chaos_summary 1 duplicate_acks)
skip0=$(chaos_summary 0 skipped_steps); skip1=$(chaos_summary 1 skipped_steps)
acked=$(( ${steps0:-0} + ${steps1:-0} ))
not_applied=$(( ${dacks0:-0} + ${dacks1:-0} ))
declare -A excess cap lost
for s in 0 1; do
  a=${applied[$s]:-0}; v=${ver[$s]:-0}
  excess[$s]=$(( ${a%.*} - acked ))
  cap[$s]=$(( 2 * ${v%.*} ))
  lost[$s]=$(( cap[$s] - ${a%.*} ))
done
retry_lines=$(cat "$CHAOS_WORK"/worker-*.log | grep -c 'retrying' || true)

echo
echo "-- figures"
echo "freeze lasted $(pyval "round($t_cont - $t_stop, 1)")s (shard 1 in state '$s1_state' at the end; version ${v1_before:-?} at the STOP)"
echo "workers noticed the frozen shard after ${notice0}s (worker 0) and ${notice1}s (worker 1) (bar: keepalive ${keepalive_s}s + timeout ${keepalive_timeout_s}s + 1s)"
echo "during the freeze shard 0 held at version ${v_frozen}; after SIGCONT both shards were past it after ${resume_s}s"
echo "   (first sample after SIGCONT: shard 1 at ${v1_first}; samples every ~0.4 s)"
echo "worker exit codes: $rc0 $rc1; server exit codes on SIGTERM: $CHAOS_SERVER_RCS; shard versions at the end: ${ver[0]:-?} ${ver[1]:-?} (max_steps $max_steps)"
echo "workers: steps ${steps0:-?} ${steps1:-?}, skipped_steps ${skip0:-?} ${skip1:-?}, duplicate_acks ${dacks0:-?} ${dacks1:-?}; 'retrying' lines $retry_lines"
for s in 0 1; do
  echo "shard $s: pushes applied ${applied[$s]:-?}, duplicate ${dup[$s]:-?}, rejected ${rej[$s]:-?}; acknowledged $acked;" \
       "applied - acknowledged = ${excess[$s]}; at most 2 x version = ${cap[$s]} contributions fit"
done
d_lo=$(( excess[0] > 0 ? excess[0] : 0 )); d_lo=$(( d_lo + (excess[1] > 0 ? excess[1] : 0) ))
d_hi=$(( excess[0] + excess[1] + not_applied ))
[ "$d_hi" -lt 0 ] && d_hi=0
echo "double applies (both shards): between $d_lo and $d_hi (exact when the workers' not-applied acknowledgements, $not_applied, are 0)"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) CPUs)"
echo

chaos_expect "no process exited during the ${freeze_s}s freeze${exited_during:+ (exited:$exited_during)}" \
  '[ -z "$exited_during" ]'
bar=$((keepalive_s + keepalive_timeout_s + 1))
chaos_expect "clients notice within keepalive time + timeout (figure): worker 0 ${notice0}s, worker 1 ${notice1}s <= ${keepalive_s} + ${keepalive_timeout_s} + 1 s" \
  '[ "$notice0" != - ] && [ "$notice1" != - ] && pytrue "$notice0 <= $bar and $notice1 <= $bar"'
chaos_expect "progress resumes <= 5 s after -CONT (figure): ${resume_s}s (both shards' versions moving)" \
  '[ "$resume_s" != - ] && pytrue "$resume_s <= 5"'
chaos_expect "the run finishes, both workers exit 0 (got $rc0, $rc1)" '[ "$rc0" = 0 ] && [ "$rc1" = 0 ]'
chaos_expect "both shards end at version = max_steps ($max_steps): ${ver[0]:-?}, ${ver[1]:-?}" \
  '[ "${ver[0]%.*}" = "$max_steps" ] && [ "${ver[1]%.*}" = "$max_steps" ]'
chaos_expect "servers exit 0 on SIGTERM (got $CHAOS_SERVER_RCS)" '[ "$CHAOS_SERVER_RCS" = "0 0" ]'
chaos_expect "0 double applies (figure; bound, see header): applied - acknowledged <= 0 and applied <= 2 x version on each shard (shard 0: ${excess[0]}, ${applied[0]:-?} <= ${cap[0]}; shard 1: ${excess[1]}, ${applied[1]:-?} <= ${cap[1]}; upper bound $d_hi)" \
  '[ "${excess[0]}" -le 0 ] && [ "${excess[1]}" -le 0 ] && [ "${applied[0]%.*}" -le "${cap[0]}" ] && [ "${applied[1]%.*}" -le "${cap[1]}" ]'
# Not one of this scenario's RELIABILITY.md figures, but the "exact update
# count" of the network-fault ones: both workers stayed alive and in every
# step, so every completed step on each shard must hold both workers'
# gradients.
chaos_expect "exact update count: every step on each shard holds both workers' gradients, applied = 2 x version (shard 0: ${applied[0]:-?} of ${cap[0]}, shard 1: ${applied[1]:-?} of ${cap[1]}; lost contributions ${lost[0]}, ${lost[1]})" \
  '[ "${lost[0]}" = 0 ] && [ "${lost[1]}" = 0 ]'
[ "$CHAOS_FAILED" = 0 ] || chaos_dump_logs 12
chaos_finish
