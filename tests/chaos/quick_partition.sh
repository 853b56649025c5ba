#!/usr/bin/env bash
# Fast network-fault check for `make test` (CTest: chaos_quick_partition_test):
# worker 1 of a short synchronous Fashion-MNIST run is cut off from both
# servers for 10 s, then the partition heals. Passes when worker 1 retried
# ("retrying" in its log) and reconnected, both workers exit 0, both shards
# end at max_steps and the servers exit 0 on SIGTERM. About 30-60 s.
#
# Usage: quick_partition.sh [BIN_DIR [SOURCE_DIR]]
#   env: PARTITION_S (10), MAX_STEPS (5000: long enough that worker 0, which
#        trains alone at up to ~300 steps/s during the partition, is still
#        running at the heal), SUBNET (169.254.82).
# Exit 0 passed, 1 failed, 77 namespaces/iptables unavailable (skip).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 1 ] && CHAOS_BIN=$1
[ $# -ge 2 ] && CHAOS_SRC=$2
source "$here/lib.sh"

partition_s=${PARTITION_S:-10}
max_steps=${MAX_STEPS:-5000}
chaos_init quick_partition "${SUBNET:-169.254.82}"
chaos_hosts s0 s1 w0 w1
job="$CHAOS_SRC/examples/fashion_mnist_mlp.textproto"
flags=(--max_steps="$max_steps" --epochs=1000)

chaos_start_servers "$job" "${flags[@]}"
chaos_start_worker w0 0 "$job" "${flags[@]}" --evaluate=false
chaos_start_worker w1 1 "$job" "${flags[@]}" --evaluate=false
deadline=$((SECONDS + 60))
until v=$(chaos_metric s0 tessera_shard_version) && [ -n "$v" ] && [ "${v%.*}" -ge 50 ]; do
  if [ $SECONDS -gt $deadline ]; then chaos_fail "training never started"; chaos_dump_logs; chaos_finish; fi
  sleep 0.2
done
fault_partition w1 s0 s1
t_part=$(now_s)
chaos_log "worker 1 partitioned from both servers at shard 0 version $v"
sleep "$partition_s"
alive=1
for p in server-0 server-1 worker-0 worker-1; do
  kill -0 "$(chaos_pid "$p")" 2>/dev/null || alive=0
done
fault_heal w1
t_heal=$(now_s)
chaos_log "healed"
rc0=0; chaos_wait worker-0 120 || rc0=$?
rc1=0; chaos_wait worker-1 120 || rc1=$?
v_end="$(chaos_servers_metric tessera_shard_version)"
chaos_stop_servers
chaos_grep worker-1 'retrying|reconnected' | while read -r ts rest; do
  printf '  t=%5.1fs after the partition: %s\n' "$(pyval "$ts - $t_part")" "${rest:0:200}"
done
echo "  partition ${partition_s}s, heal at t=$(pyval "round($t_heal - $t_part, 1)")s; workers exit $rc0 $rc1; shard versions $v_end; worker 1 duplicate_acks $(chaos_summary 1 duplicate_acks)"
chaos_expect "no process exited during the partition" '[ "$alive" = 1 ]'
chaos_expect "worker 1 retried and reconnected" \
  '[ -n "$(chaos_grep worker-1 retrying)" ] && [ -n "$(chaos_grep worker-1 reconnected)" ]'
chaos_expect "the run finishes: both workers exit 0 ($rc0 $rc1)" '[ "$rc0 $rc1" = "0 0" ]'
chaos_expect "both shards end at version $max_steps ($v_end)" '[ "$v_end" = "$max_steps $max_steps" ]'
chaos_expect "servers exit 0 on SIGTERM ($CHAOS_SERVER_RCS)" '[ "$CHAOS_SERVER_RCS" = "0 0" ]'
[ "$CHAOS_FAILED" = 0 ] || chaos_dump_logs 12
chaos_finish
