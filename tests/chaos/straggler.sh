#!/usr/bin/env bash
# A straggler in a synchronous job, with and without a backup worker.
# Worker 1 of a synchronous Fashion-MNIST job (2 servers, 2 workers) runs in
# a cgroup (v1 cpu controller) that gives it STRAGGLER_PERCENT of one CPU:
# a deterministic straggler (RELIABILITY.md, "Tools"). Three runs of
# MAX_STEPS steps each:
#   base    no straggler, every worker in every step;
#   slow    the straggler, every worker in every step: the job runs at the
#           straggler's pace;
#   backup  the straggler, --backup_workers=1 on every process: a step
#           applies the first gradient to reach a shard, so worker 0 no
#           longer waits for worker 1.
# Step rate: the steps from the moment worker 1 is held back (both workers
# have taken 10 steps by then) to worker 0's exit, over that time.
# RELIABILITY.md names no straggler figure; the bar here is the one it sets
# for the workers that keep going while another is down: the backup run
# keeps >= 50% of the base run's step rate. Also checked: every run finishes
# (both workers exit 0, both shards at MAX_STEPS) with the exact count of
# gradients, 2 per step without a backup worker and 1 with it, 0 duplicates
# and 0 rejected; in the backup run some pushes are late, and the workers'
# summaries count as many late acknowledgements as the servers count late
# pushes.
#
# Usage: straggler.sh [BIN_DIR [SOURCE_DIR]]
#   env: MAX_STEPS (600), STRAGGLER_PERCENT (10), RUN_LIMIT_S (180 per run),
#        SUBNET (169.254.86), CHAOS_KEEP_LOGS=DIR.
# Exit 0 passed, 1 failed, 77 namespaces or the cgroup cpu controller
# unavailable (skip).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 1 ] && CHAOS_BIN=$1
[ $# -ge 2 ] && CHAOS_SRC=$2
source "$here/lib.sh"

max_steps=${MAX_STEPS:-600}
percent=${STRAGGLER_PERCENT:-10}
run_limit_s=${RUN_LIMIT_S:-180}
cpu_root=/sys/fs/cgroup/cpu
if [ ! -w "$cpu_root" ] || [ ! -e "$cpu_root/cpu.cfs_quota_us" ]; then
  echo "SKIP: no writable cgroup v1 cpu controller at $cpu_root"; exit 77
fi
chaos_init straggler "${SUBNET:-169.254.86}"
cgroup="$cpu_root/tessera-straggler-$$"
mkdir "$cgroup"
# The cgroup goes once chaos_cleanup has killed what ran in it.
trap 'chaos_cleanup; rmdir "$cgroup" 2>/dev/null || true' EXIT
echo 100000 > "$cgroup/cpu.cfs_period_us"
echo $((1000 * percent)) > "$cgroup/cpu.cfs_quota_us"
chaos_hosts s0 s1 w0 w1
job="$CHAOS_SRC/examples/fashion_mnist_mlp.textproto"
base_flags=(--max_steps="$max_steps" --epochs=1000)

declare -A rcs rate sps applied dup late rej ver skipped lacks
worker_steps() {  # rank: steps the worker has taken (its /metrics), 0 when unknown
  local v
  v=$(chaos_metric "w$1" tessera_worker_steps_total)
  v=${v%.*}
  echo "${v:-0}"
}
run_once() {  # tag straggler(0|1) backup_workers
  local tag=$1 slow=$2 backup=$3
  local flags=("${base_flags[@]}")
  [ "$backup" != 0 ] && flags+=(--backup_workers="$backup")
  chaos_start_servers "$job" "${flags[@]}"
  local t0=$SECONDS
  chaos_start_worker w0 0 "$job" "${flags[@]}" --evaluate=false
  chaos_start_worker w1 1 "$job" "${flags[@]}" --evaluate=false
  # Both workers training before worker 1 is held back (held from the
  # start, it would still be loading its data when worker 0, with a backup
  # worker, had finished the job alone).
  until [ "$(worker_steps 0)" -ge 10 ] && [ "$(worker_steps 1)" -ge 10 ]; do
    if [ $((SECONDS - t0)) -gt 60 ]; then
      chaos_fail "$tag: the workers never both started training"; chaos_dump_logs 12; chaos_finish
    fi
    sleep 0.1
  done
  # Moving the process moves all its threads (cgroup v1 cgroup.procs);
  # the ones it starts later are born in the cgroup.
  if [ "$slow" = 1 ]; then echo "$(chaos_pid worker-1)" > "$cgroup/cgroup.procs"; fi
  local t1 v1 t_end
  t1=$(now_s)
  v1=$(chaos_metric s0 tessera_shard_version)
  while chaos_alive worker-0 && [ $((SECONDS - t0)) -lt "$run_limit_s" ]; do sleep 0.1; done
  t_end=$(now_s)
  chaos_wait_workers $((run_limit_s - (SECONDS - t0))) 0.2  # sets rc0, rc1
  rcs[$tag]="$rc0 $rc1"
  # Steps from the moment worker 1 was held back to worker 0's exit.
  rate[$tag]=$(pyval "round(($max_steps - ${v1:-0}) / ($t_end - $t1), 1)")
  sps[$tag]=$(chaos_summary 0 samples_per_sec)
  skipped[$tag]="$(chaos_summary 0 skipped_steps) $(chaos_summary 1 skipped_steps)"
  lacks[$tag]="$(chaos_summary 0 late_acks) $(chaos_summary 1 late_acks)"
  applied[$tag]="$(chaos_servers_metric tessera_pushes_total applied)"
  dup[$tag]="$(chaos_servers_metric tessera_pushes_total duplicate)"
  late[$tag]="$(chaos_servers_metric tessera_pushes_total 'outcome="late"')"
  rej[$tag]="$(chaos_servers_metric tessera_pushes_total rejected)"
  ver[$tag]="$(chaos_servers_metric tessera_shard_version)"
  chaos_stop_servers
  printf '%-7s straggler %s backup_workers %s: workers exit %-5s %6s steps/s from step %s to the end (%ss); worker 0 %s applied samples/s; shard versions %s; pushes applied %s, late %s, duplicate %s, rejected %s; skipped steps (workers 0, 1) %s; late acknowledgements (workers 0, 1) %s\n' \
    "$tag" "$slow" "$backup" "${rcs[$tag]}" "${rate[$tag]}" "${v1:-?}" "$(pyval "round($t_end - $t1, 1)")" \
    "${sps[$tag]:-?}" "${ver[$tag]}" "${applied[$tag]}" "${late[$tag]}" "${dup[$tag]}" \
    "${rej[$tag]}" "${skipped[$tag]}" "${lacks[$tag]}"
  chaos_archive "run-$tag"
}

echo "== straggler: sync Fashion-MNIST, 2 servers, 2 workers, max_steps $max_steps;"
echo "   worker 1 held to ${percent}% of one CPU (cgroup cpu.cfs_quota_us) in the slow and backup runs"
run_once base 0 0
run_once slow 1 0
run_once backup 1 1
echo
ratio=$(pyval "round(${rate[backup]} / ${rate[base]}, 3) if ${rate[base]} > 0 else 0")
echo "step rate: ${rate[base]} without the straggler, ${rate[slow]} with it, ${rate[backup]} with it and one backup worker ($(pyval "round(100 * $ratio, 1)")% of the first)"
echo

exact() {  # tag gradients_per_step
  local want=$(($2 * max_steps))
  [ "${ver[$1]}" = "$max_steps $max_steps" ] && [ "${applied[$1]}" = "$want $want" ] &&
    [ "${dup[$1]}" = "0 0" ] && [ "${rej[$1]}" = "0 0" ]
}
for t in base slow backup; do
  chaos_expect "$t: both workers exit 0 (${rcs[$t]})" '[ "${rcs[$t]}" = "0 0" ]'
done
chaos_expect "base and slow: every step holds both workers' gradients on each shard (versions ${ver[base]} / ${ver[slow]}; applied ${applied[base]} / ${applied[slow]})" \
  'exact base 2 && exact slow 2'
chaos_expect "backup: every step holds exactly one gradient on each shard, 0 duplicate, 0 rejected (versions ${ver[backup]}; applied ${applied[backup]})" \
  'exact backup 1'
chaos_expect "backup: the straggler's pushes came late and were dropped (late ${late[backup]})" \
  'pytrue "sum(map(float, \"${late[backup]}\".split())) >= 1"'
chaos_expect "backup: the workers were told of each late push (late acknowledgements ${lacks[backup]}; servers' late ${late[backup]})" \
  'pytrue "sum(map(float, \"${lacks[backup]}\".split())) == sum(map(float, \"${late[backup]}\".split()))"'
chaos_expect "the straggler slows the job without a backup worker: ${rate[slow]} < ${rate[base]} steps/s" \
  'pytrue "${rate[slow]} < ${rate[base]}"'
chaos_expect "with one backup worker the job keeps >= 50% of its straggler-free step rate: $(pyval "round(100 * $ratio, 1)")%" \
  'pytrue "$ratio >= 0.5"'
[ "$CHAOS_FAILED" = 0 ] || chaos_dump_logs 12
chaos_finish
