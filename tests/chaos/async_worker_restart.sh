#!/usr/bin/env bash
# Worker killed in ASYNC mode mid-training and restarted with the same rank.
# Checks the RELIABILITY.md figures "Worker killed in async mode mid-training
# and restarted: the job finishes; the other workers keep >= 50% of their
# step rate meanwhile; final loss within 2% of a fault-free run; 0 double
# applies".
#
# Job: a copy of examples/fashion_mnist_mlp.textproto with consistency ASYNC
# and a cosine learning-rate decay over max_steps (the servers schedule the
# rate by the pushing worker's own step). Without the decay the held-out loss
# of the final parameters swings by 4-5% from one fault-free run to the next
# (Adam at a constant 0.001 is still bouncing at the end), which drowns a 2%
# bar; with it, fault-free runs agree to about 1%.
#
# Two runs in the same script, 2 servers and 2 workers each:
#   base:  fault-free; its final loss and worker 0's step rate are the
#          reference.
#   fault: after WARMUP_S of training worker 1 is cut off from both servers
#          (iptables at the receivers), its completed step count is read from
#          its /metrics (it cannot advance while cut off), it is killed with
#          SIGKILL, the cut is healed, and RESTART_S later worker 1 is started
#          again with the same rank (the coordinator hands it a new
#          incarnation; the servers tell it how many steps its rank had
#          completed, and it continues from there: summary "first_step").
#
# Figures:
#   - both runs finish: every worker process that was not killed exits 0;
#   - worker 0's step rate (tessera_worker_step sampled from its /metrics)
#     from the cut until the restarted worker 1 completes its first step,
#     against its rate over the WARMUP_S before the cut (same run, same
#     machine load): >= 50%;
#   - final loss: held-out loss of the final parameters, i.e. the test_loss
#     in --summary_json of the worker that exits last (its last push-and-pull
#     returns the parameters after every push of the run, the other workers
#     having finished before); fault run within 2% of the base run;
#   - double applies, per shard: applied = tessera_pushes_total{outcome=
#     "applied"} against acknowledged = the steps each worker incarnation
#     completed (every completed step is one push acknowledged by every
#     shard): summary "steps" of worker 0 and of the restarted worker 1, plus
#     the killed incarnation's tessera_worker_step read while it was cut off.
#     applied - acknowledged is exact for the base run (must be 0). In the
#     fault run the killed incarnation has exactly one push that may have been
#     applied without being counted: its step in flight at the cut (applied by
#     a shard, but the reply was dropped, or the other shard's reply was, so
#     the step never completed). So applied - acknowledged per shard is
#     0 or 1 without double applies; a double apply (a resent push applied
#     twice) adds 1 on top, and less than 0 would be a lost acknowledged
#     update. The check is 0 <= applied - acknowledged <= 1: exact for lost
#     updates, and an upper bound of 1 on double applies that is exact
#     (0 double applies) whenever the figure is 0. Worker-side duplicate
#     acknowledgements (summary duplicate_acks) and the servers' duplicate
#     counters are printed too.
#
# Usage: async_worker_restart.sh [BIN_DIR [SOURCE_DIR]]
#   env: MAX_STEPS (6000 per worker: worker 0 must still be training when the
#        restarted worker 1 comes back), WARMUP_S (3), RESTART_S (3),
#        RUN_LIMIT_S (120 per run), SUBNET (169.254.83), CHAOS_KEEP_LOGS=DIR.
# Exit 0 all passed, 1 a figure failed, 77 namespaces/iptables unavailable.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 1 ] && CHAOS_BIN=$1
[ $# -ge 2 ] && CHAOS_SRC=$2
source "$here/lib.sh"

max_steps=${MAX_STEPS:-6000}
warmup_s=${WARMUP_S:-3}
restart_s=${RESTART_S:-3}
run_limit_s=${RUN_LIMIT_S:-120}
chaos_init async_worker_restart "${SUBNET:-169.254.83}"
chaos_hosts s0 s1 w0 w1

job="$CHAOS_WORK/fashion_mnist_async.textproto"
/usr/bin/python3 - "$CHAOS_SRC/examples/fashion_mnist_mlp.textproto" "$job" "$max_steps" <<'EOF'
import re, sys
src, dst, steps = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(src).read()
text, n1 = re.subn(r"mode:\s*SYNC", "mode: ASYNC", text)
text, n2 = re.subn(r"(learning_rate:\s*[0-9.eE+-]+)",
                   r"\1\n  schedule: COSINE\n  decay_steps: %s\n  min_learning_rate: 0.00001" % steps,
                   text, count=1)
if n1 != 1 or n2 != 1:
    sys.exit("cannot rewrite %s (mode or learning_rate not found)" % src)
open(dst, "w").write(text)
EOF
flags=(--max_steps="$max_steps" --epochs=1000)


declare -A final_loss last_worker rcs applied dup rej ver steps first dacks acked excess retries
samples=""
# Each row is stamped right after worker 0's step is read (its rate is the
# figure), the other scrapes follow.
sample() {  # phase: t phase w0step w1step v0 v1
  local w0 t
  w0=$(chaos_metric w0 tessera_worker_step)
  t=$(now_s)
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$1" "$w0" "$(chaos_metric w1 tessera_worker_step)" \
    "$(chaos_metric s0 tessera_shard_version)" "$(chaos_metric s1 tessera_shard_version)" >> "$samples"
}
# sample_for PHASE SECONDS: sample every ~0.25 s for SECONDS.
sample_for() {
  local t0
  t0=$(now_s)
  while pytrue "$(now_s) - $t0 < $2"; do sample "$1"; sleep 0.2; done
}

# wait_start: until worker 0 has completed a step (bounded).
wait_start() {
  local deadline=$((SECONDS + 60)) v
  until v=$(chaos_metric w0 tessera_worker_step) && [ -n "$v" ] && [ "${v%.*}" -gt 0 ]; do
    if [ $SECONDS -gt $deadline ]; then
      chaos_fail "$1: training never started"; chaos_dump_logs; chaos_finish
    fi
    sleep 0.1
  done
}

# finish_run TAG T0: sample until both workers exit (bounded), note who exits
# last, collect the figures, stop the servers.
finish_run() {
  local tag=$1 t0=$2 r rc last="" w
  local -A gone=()
  while :; do
    for w in 0 1; do
      if [ -z "${gone[$w]:-}" ] && ! chaos_alive "worker-$w"; then gone[$w]=1; last=$w; fi
    done
    [ "${#gone[@]}" = 2 ] && break
    [ $((SECONDS - t0)) -gt "$run_limit_s" ] && break
    sample finishing
    sleep 0.2
  done
  rcs[$tag]=""
  for w in 0 1; do
    rc=0; chaos_wait "worker-$w" 1 || rc=$?
    if [ "$rc" = 124 ]; then kill -9 "$(chaos_pid "worker-$w")" 2>/dev/null || true; fi
    rcs[$tag]+="${rcs[$tag]:+ }$rc"
    steps[$tag.$w]=$(chaos_summary "$w" steps)
    first[$tag.$w]=$(chaos_summary "$w" first_step)
    dacks[$tag.$w]=$(chaos_summary "$w" duplicate_acks)
  done
  # The last to finish: the newer --summary_json (written as a worker exits);
  # the exit order seen by the polling above when one is missing.
  if [ -f "$CHAOS_WORK/summary-0.json" ] && [ -f "$CHAOS_WORK/summary-1.json" ]; then
    last=$(/usr/bin/python3 -c "import os, sys; m = [os.stat(p).st_mtime_ns for p in sys.argv[1:]]; print(0 if m[0] > m[1] else 1)" \
      "$CHAOS_WORK/summary-0.json" "$CHAOS_WORK/summary-1.json")
  fi
  last_worker[$tag]=${last:--}
  final_loss[$tag]=$( [ -n "$last" ] && chaos_summary "$last" test_loss || true)
  for s in 0 1; do
    applied[$tag.$s]=$(chaos_metric "s$s" tessera_pushes_total 'outcome="applied"')
    dup[$tag.$s]=$(chaos_metric "s$s" tessera_pushes_total 'outcome="duplicate"')
    rej[$tag.$s]=$(chaos_metric "s$s" tessera_pushes_total 'outcome="rejected"')
    ver[$tag.$s]=$(chaos_metric "s$s" tessera_shard_version)
  done
  retries[$tag]=$(cat "$CHAOS_WORK"/worker-*.log 2>/dev/null | grep -c 'retrying' || true)
  chaos_stop_servers
  rcs[$tag.servers]=$CHAOS_SERVER_RCS
}

echo "== async_worker_restart: ASYNC Fashion-MNIST (cosine decay over $max_steps steps), 2 servers,"
echo "   2 workers x $max_steps steps; fault run: worker 1 killed (SIGKILL) after ${warmup_s}s of"
echo "   training, restarted with the same rank ${restart_s}s later"

# ---- base run (fault-free)
samples="$CHAOS_WORK/samples-base.tsv"
chaos_start_servers "$job" "${flags[@]}"
chaos_start_worker w0 0 "$job" "${flags[@]}" --evaluate=true
chaos_start_worker w1 1 "$job" "${flags[@]}" --evaluate=true
t_run=$SECONDS
wait_start base
t_base_start=$(now_s)
sample_for base "$warmup_s"
t_base_mark=$(now_s)
finish_run base "$t_run"
chaos_log "base run done: workers exit ${rcs[base]}, last to exit: worker ${last_worker[base]}"
chaos_archive run-base

# ---- fault run
samples="$CHAOS_WORK/samples-fault.tsv"
chaos_start_servers "$job" "${flags[@]}"
chaos_start_worker w0 0 "$job" "${flags[@]}" --evaluate=true
chaos_start_worker w1 1 "$job" "${flags[@]}" --evaluate=true
t_run=$SECONDS
wait_start fault
t_start=$(now_s)
sample_for before "$warmup_s"
status_before=$(chaos_in s0 "$CHAOS_BIN/tessera" status "$(chaos_ip s0):$CHAOS_PORT" --once 2>&1 || true)

t_cut=$(now_s)
fault_partition w1 s0 s1
chaos_log "worker 1 cut off from both servers"
sample_for cut 1
killed_steps=$(chaos_metric w1 tessera_worker_step)
killed_steps=${killed_steps%.*}
w1_alive_at_kill=0; chaos_alive worker-1 && w1_alive_at_kill=1
kill -9 "$(chaos_pid worker-1)" 2>/dev/null || true
# (stderr: keep bash's "Killed" job notice out of the output)
rc_killed=0; chaos_wait worker-1 10 2>/dev/null || rc_killed=$?
t_kill=$(now_s)
fault_heal w1
chaos_log "worker 1 killed (exit $rc_killed) after ${killed_steps:-?} completed steps; cut healed"
mv "$CHAOS_WORK/worker-1.log" "$CHAOS_WORK/worker-1-killed.log"
rm -f "$CHAOS_WORK/summary-1.json"
sample_for down "$restart_s"
t_restart=$(now_s)
chaos_start_worker w1 1 "$job" "${flags[@]}" --evaluate=true
chaos_log "worker 1 restarted"
# Until the restarted worker completes a step (bounded), then a little more.
deadline=$((SECONDS + 60))
while :; do
  sample restarting
  v=$(tail -n 1 "$samples" | cut -f4)
  [ -n "$v" ] && [ "${v%.*}" -gt 0 ] && break
  chaos_alive worker-1 || break
  [ $SECONDS -gt $deadline ] && break
  sleep 0.1
done
status_after=$(chaos_in s0 "$CHAOS_BIN/tessera" status "$(chaos_ip s0):$CHAOS_PORT" --once 2>&1 || true)
finish_run fault "$t_run"
chaos_log "fault run done: workers exit ${rcs[fault]}, last to exit: worker ${last_worker[fault]}"

# ---- figures
read -r base_rate pre_rate out_rate back_s w0_done_in_outage < <(/usr/bin/python3 - \
  "$CHAOS_WORK/samples-base.tsv" "$t_base_start" "$t_base_mark" \
  "$samples" "$t_start" "$t_cut" <<'EOF'
import sys
def rows(path):
    out = []
    for l in open(path):
        r = l.rstrip("\n").split("\t")
        try:
            out.append((float(r[0]), r[1], float(r[2]) if r[2] else None,
                        float(r[3]) if r[3] else None))
        except ValueError:
            pass
    return out
def rate(rs, t0, t1, col=2):
    pts = [(t, r[col]) for r in rs for t in [r[0]] if t0 <= t <= t1 and r[col] is not None]
    if len(pts) < 2 or pts[-1][0] - pts[0][0] <= 0: return None
    return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])
base = rows(sys.argv[1]); tb0, tb1 = float(sys.argv[2]), float(sys.argv[3])
fault = rows(sys.argv[4]); t0, tcut = float(sys.argv[5]), float(sys.argv[6])
# Skip the first half second of each window (startup transients).
b = rate(base, tb0 + 0.5, tb1)
pre = rate(fault, t0 + 0.5, tcut)
# The outage ends at the first sample, after the restart, in which the
# restarted worker 1 has completed a step.
back = None
for r in fault:
    if r[1] in ("restarting", "finishing") and r[3] is not None and r[3] > 0:
        back = r[0]; break
end = back if back is not None else (fault[-1][0] if fault else tcut)
# Worker 0 may finish inside the outage: only count samples while it ran.
w0_rows = [r for r in fault if tcut <= r[0] <= end and r[2] is not None]
w0_done = any(r[2] is None for r in fault if tcut <= r[0] <= end)
out = rate(fault, tcut, end)
f = lambda x: "-" if x is None else "%.1f" % x
print(f(b), f(pre), f(out), f(None if back is None else back - tcut), int(w0_done))
EOF
)

for tag in base fault; do
  a_killed=0; [ "$tag" = fault ] && a_killed=${killed_steps:-0}
  for s in 0 1; do
    acked[$tag.$s]=$(( ${steps[$tag.0]:-0} + ${steps[$tag.1]:-0} + a_killed ))
    a=${applied[$tag.$s]:-0}
    excess[$tag.$s]=$(( ${a%.*} - ${acked[$tag.$s]} ))
  done
done

echo
echo "-- fault run timeline (t relative to the cut; w0/w1 = tessera_worker_step of workers 0/1,"
echo "   v0/v1 = tessera_shard_version of shards 0/1 = pushes applied so far)"
/usr/bin/python3 - "$samples" "$t_cut" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
tc = float(sys.argv[2])
print("%8s %-10s %6s %6s %7s %7s" % ("t", "phase", "w0", "w1", "v0", "v1"))
last_phase = None
for i, r in enumerate(rows):
    t = float(r[0]) - tc
    if -1.5 <= t <= 12 or i % 8 == 0 or i == len(rows) - 1 or r[1] != last_phase:
        if i % 2 == 0 or r[1] != last_phase or i == len(rows) - 1:
            print("%8.1f %-10s %6s %6s %7s %7s" % (t, r[1], r[2] or "-", r[3] or "-",
                                                  r[4] or "-", r[5] or "-"))
    last_phase = r[1]
EOF
echo
echo "-- the coordinator's view (tessera status --once) before the cut / once the restarted worker 1 stepped"
echo "$status_before" | grep -v '^ *$' | head -8 | sed 's/^/   before: /'
echo "$status_after" | grep -v '^ *$' | head -8 | sed 's/^/   after:  /'
echo
echo "-- log lines about the fault (t relative to the cut)"
log_lines=$(for f in worker-0 worker-1-killed worker-1 server-0 server-1; do
  chaos_grep "$f" 'retrying|reconnected|gave up|rror|failed|incarnation|refused' | head -8 |
    while read -r ts rest; do
      printf '%8.1f %s: %s\n' "$(pyval "$ts - $t_cut")" "$f" "${rest:0:200}"
    done
done)
echo "${log_lines:-   (none: no retry, error or refusal in any log)}"

echo
echo "-- figures"
for tag in base fault; do
  echo "$tag: workers exit ${rcs[$tag]} (worker 1 = the restarted one in the fault run), servers exit on SIGTERM ${rcs[$tag.servers]};" \
       "last to exit: worker ${last_worker[$tag]}, final held-out loss ${final_loss[$tag]:-?}"
  echo "   steps: worker 0 ${steps[$tag.0]:-?}, worker 1 ${steps[$tag.1]:-?}$([ "$tag" = fault ] && echo ", killed incarnation of worker 1 ${killed_steps:-?} (alive until the kill: $w1_alive_at_kill, SIGKILL exit $rc_killed)");" \
       "duplicate_acks ${dacks[$tag.0]:-?} ${dacks[$tag.1]:-?}; 'retrying' lines ${retries[$tag]}"
  for s in 0 1; do
    echo "   shard $s: version ${ver[$tag.$s]:-?}, pushes applied ${applied[$tag.$s]:-?}, duplicate ${dup[$tag.$s]:-?}, rejected ${rej[$tag.$s]:-?};" \
         "acknowledged ${acked[$tag.$s]}; applied - acknowledged = ${excess[$tag.$s]}"
  done
done
echo "the restarted worker 1 pushed steps 0.. again and none was taken for a duplicate (servers' duplicate counts above): it came back as a new incarnation"
echo "worker 0's step rate: base run ${base_rate} steps/s; fault run ${pre_rate} steps/s before the cut,"
echo "   ${out_rate} steps/s from the cut until the restarted worker 1 completed a step (${back_s}s after the cut${w0_done_in_outage:+; worker 0 finished inside that window: $w0_done_in_outage})"
rate_ratio=$(pyval "round($out_rate / $pre_rate, 3) if '$out_rate' != '-' and '$pre_rate' not in ('-', '0.0') else -1")
loss_diff=$(pyval "round(100 * abs(${final_loss[fault]:-0} - ${final_loss[base]:-0}) / ${final_loss[base]:-0}, 2) if ${final_loss[base]:-0} > 0 and ${final_loss[fault]:-0} > 0 else -1")
echo "final loss: base ${final_loss[base]:-?}, fault ${final_loss[fault]:-?}: differ by ${loss_diff}%"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) CPUs)"
echo

chaos_expect "base run: both workers and both servers exit 0 (${rcs[base]}; servers ${rcs[base.servers]})" \
  '[ "${rcs[base]}" = "0 0" ] && [ "${rcs[base.servers]}" = "0 0" ]'
chaos_expect "base run: exact update count, applied = acknowledged on both shards (differences ${excess[base.0]}, ${excess[base.1]})" \
  '[ "${excess[base.0]}" = 0 ] && [ "${excess[base.1]}" = 0 ]'
chaos_expect "the job finishes after the kill: worker 0 and the restarted worker 1 exit 0 having reached step $max_steps (exit ${rcs[fault]}; worker 0 steps ${steps[fault.0]:-?}; worker 1 resumed at ${first[fault.1]:-?} and took ${steps[fault.1]:-?} steps)" \
  '[ "${rcs[fault]}" = "0 0" ] && [ "${steps[fault.0]:-}" = "$max_steps" ] && [ $(( ${first[fault.1]:-0} + ${steps[fault.1]:-0} )) = "$max_steps" ]'
chaos_expect "the restarted worker 1 resumes where the killed one stopped: first step ${first[fault.1]:-?}, killed incarnation completed ${killed_steps:-?} (its push in flight may count: +1)" \
  '[ -n "${killed_steps:-}" ] && [ -n "${first[fault.1]:-}" ] && { [ "${first[fault.1]}" = "$killed_steps" ] || [ "${first[fault.1]}" = "$((killed_steps + 1))" ]; }'
chaos_expect "servers exit 0 on SIGTERM after the fault run (${rcs[fault.servers]})" '[ "${rcs[fault.servers]}" = "0 0" ]'
chaos_expect "worker 0 keeps >= 50% of its step rate while worker 1 is down (figure): ${out_rate} of ${pre_rate} steps/s = $(pyval "round(100 * $rate_ratio, 1)")%" \
  'pytrue "$rate_ratio >= 0.5"'
chaos_expect "final loss within 2% of the fault-free run (figure): ${final_loss[fault]:-?} vs ${final_loss[base]:-?}, ${loss_diff}%" \
  'pytrue "0 <= $loss_diff <= 2"'
chaos_expect "0 double applies (figure; bound, see header): applied - acknowledged in {0, 1} on each shard (shard 0: ${excess[fault.0]}, shard 1: ${excess[fault.1]}; 1 = the killed worker's push in flight)" \
  '[ "${excess[fault.0]}" -ge 0 ] && [ "${excess[fault.0]}" -le 1 ] && [ "${excess[fault.1]}" -ge 0 ] && [ "${excess[fault.1]}" -le 1 ]'
[ "$CHAOS_FAILED" = 0 ] || chaos_dump_logs 12
chaos_finish
