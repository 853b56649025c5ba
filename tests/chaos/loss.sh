#!/usr/bin/env bash
# Random packet loss (1% and 5%, each direction) on worker 1's link in a
# synchronous Fashion-MNIST job, against loss-free runs in the same script.
# Checks the RELIABILITY.md figures "Random loss 1% and 5%: 0 failed steps;
# exact update count; throughput >= 90% / 50% of loss-free".
#
# Throughput is samples/s from worker 0's --summary_json (no evaluation, so
# only training steps count). The loss-free run is measured before and after
# the lossy runs and averaged, since other work shares the CPU.
#
# Usage: loss.sh [BIN_DIR [SOURCE_DIR]]
#   env: MAX_STEPS (200), RUN_LIMIT_S (120 per run), SUBNET (169.254.79),
#        CHAOS_KEEP_LOGS=DIR,
#        TCP_RTO_MIN_US: when set, --tcp_rto_min_us for every server and
#        worker (their default is 5000: an 8 ms floor at HZ=250; 0 keeps
#        the system's 200 ms). A lost retransmission or tail segment costs
#        at least one RTO, far longer than a step here, so this floor
#        decides the figures.
#        RTO_MIN_US: when set, net.ipv4.tcp_rto_min_us in every host's
#        namespace (the system-wide floor, for comparison).
#        BACKUP_WORKERS: when set, --backup_workers for every server and
#        worker (a step applies the first 2 - BACKUP_WORKERS gradients, so a
#        worker stalled by a lost segment holds nobody up; the exact count
#        becomes (2 - BACKUP_WORKERS) applied pushes per step). The figures
#        of RELIABILITY.md are for the default, 0.
#        TCP_CONGESTION: when set, --tcp_congestion for every server and
#        worker (for example bbr or cubic); otherwise they use the system's
#        algorithm, which the script prints.
#        QUICKACK=1: `quickack 1` on every route of every host namespace,
#        so the kernels acknowledge each segment at once instead of
#        delaying acknowledgements (for comparison; the figures of
#        RELIABILITY.md are for the kernel's default).
#        CAPTURE=1: capture the packets between worker 1 and each server at
#        both ends (tcpdump, headers only) during the lossy runs and print
#        each direction's retransmission stalls (tests/chaos/stalls.py): how
#        long, in the middle of a message or at its end, segment or
#        acknowledgement lost. Keep the captures with CHAOS_KEEP_LOGS.
#        tcpdump shares the CPU with the job in the lossy runs only, so the
#        throughput ratios of such a run are lower than without it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 1 ] && CHAOS_BIN=$1
[ $# -ge 2 ] && CHAOS_SRC=$2
source "$here/lib.sh"

if [ -n "${CAPTURE:-}" ] && ! command -v tcpdump > /dev/null; then
  echo "loss.sh: CAPTURE=1 needs tcpdump (apt-get install tcpdump)" >&2
  exit 2
fi
max_steps=${MAX_STEPS:-200}
run_limit_s=${RUN_LIMIT_S:-120}
CHAOS_MTU_PACKETS=w1
chaos_init loss "${SUBNET:-169.254.79}"
chaos_hosts s0 s1 w0 w1
if [ -n "${RTO_MIN_US:-}" ]; then
  for h in s0 s1 w0 w1; do chaos_in "$h" sysctl -qw net.ipv4.tcp_rto_min_us="$RTO_MIN_US"; done
  echo "== net.ipv4.tcp_rto_min_us = $RTO_MIN_US in every host namespace"
fi
if [ -n "${QUICKACK:-}" ]; then
  for h in s0 s1 w0 w1; do
    chaos_in "$h" sh -c 'ip route show | while read -r r; do ip route change $r quickack 1; done'
  done
  echo "== quickack 1 on every route of every host namespace"
fi
job="$CHAOS_SRC/examples/fashion_mnist_mlp.textproto"
flags=(--max_steps="$max_steps" --epochs=1000)
if [ -n "${TCP_RTO_MIN_US:-}" ]; then
  flags+=(--tcp_rto_min_us="$TCP_RTO_MIN_US")
  echo "== --tcp_rto_min_us=$TCP_RTO_MIN_US on every server and worker"
fi
backup=${BACKUP_WORKERS:-0}
if [ "$backup" != 0 ]; then
  flags+=(--backup_workers="$backup")
  echo "== --backup_workers=$backup on every server and worker"
fi
if [ -n "${TCP_CONGESTION:-}" ]; then
  flags+=(--tcp_congestion="$TCP_CONGESTION")
  echo "== --tcp_congestion=$TCP_CONGESTION on every server and worker"
else
  # The figures depend on it: name the one in use.
  echo "== congestion control: the system's, $(chaos_in w1 cat /proc/sys/net/ipv4/tcp_congestion_control)"
fi
batch=128  # examples/fashion_mnist_mlp.textproto, per worker

declare -A sps rcs applied dup rej ver retries wall tcp s0tcp
# A host namespace's TCP counters (absolute values: nstat's history file is
# shared by every namespace): segments sent, retransmitted, retransmission
# timeouts, reorderings seen, retransmissions held back because the original
# was still in the host's queues. Worker 1 sends its segments one MTU-sized
# packet per buffer; server 0's 64 KiB buffers are cut at the bridge.
tcp_counters() {  # host
  chaos_in "$1" nstat -asz TcpOutSegs TcpRetransSegs TcpExtTCPTimeouts TcpExtTCPSACKReorder \
      TcpExtTCPSpuriousRtxHostQueues 2>/dev/null |
    awk '{ v[$1] = $2 } END { print v["TcpOutSegs"] + 0, v["TcpRetransSegs"] + 0,
         v["TcpExtTCPTimeouts"] + 0, v["TcpExtTCPSACKReorder"] + 0,
         v["TcpExtTCPSpuriousRtxHostQueues"] + 0 }'
}
tcp_delta() {  # before after
  /usr/bin/python3 -c "import sys; a, b = sys.argv[1].split(), sys.argv[2].split()
print('%d segments sent, %d retransmitted, %d retransmission timeouts, %d reorderings, %d retransmissions held back (original still queued in the host)' % tuple(int(y) - int(x) for x, y in zip(a, b)))" \
    "$1" "$2"
}
run_once() {  # tag probability
  local tag=$1 p=$2
  chaos_start_servers "$job" "${flags[@]}"
  local w1tcp0 s0tcp0
  w1tcp0=$(tcp_counters w1)
  s0tcp0=$(tcp_counters s0)
  if [ "$p" != 0 ]; then fault_loss w1 "$p" s0 s1; fi
  local capture=""
  if [ -n "${CAPTURE:-}" ] && [ "$p" != 0 ]; then
    capture="$CHAOS_WORK/capture-$tag"
    mkdir -p "$capture"
    # Worker 1's side of each server's connections, and each server's side.
    for h in s0 s1; do
      # -U: each packet written as it comes, so SIGINT loses nothing.
      chaos_spawn w1 "tcpdump-w1-$h" tcpdump -U -i any -s 96 -w "$capture/w1-$h.pcap" \
        "tcp port $CHAOS_PORT and host $(chaos_ip "$h")"
      chaos_spawn "$h" "tcpdump-$h" tcpdump -U -i any -s 96 -w "$capture/$h.pcap" \
        "tcp port $CHAOS_PORT and host $(chaos_ip w1)"
    done
    sleep 1  # tcpdump is listening before the first packet
  fi
  local t0=$SECONDS
  chaos_start_worker w0 0 "$job" "${flags[@]}" --evaluate=false
  chaos_start_worker w1 1 "$job" "${flags[@]}" --evaluate=false
  chaos_wait_workers $((run_limit_s - (SECONDS - t0))) 0.2  # sets rc0, rc1
  rcs[$tag]="$rc0 $rc1"
  sps[$tag]=$(chaos_summary 0 samples_per_sec)
  wall[$tag]=$(chaos_summary 0 wall_seconds)
  if [ -z "${sps[$tag]}" ]; then
    # Cut at the time limit: steps done over the time since the workers started.
    local v elapsed
    v=$(chaos_metric s0 tessera_shard_version)
    elapsed=$((SECONDS - t0))
    sps[$tag]=$(pyval "${v:-0} * $batch * 2 / $elapsed")
    wall[$tag]="${elapsed} (cut at the limit after ${v:-0} steps)"
  fi
  applied[$tag]="$(chaos_servers_metric tessera_pushes_total applied)"
  dup[$tag]="$(chaos_servers_metric tessera_pushes_total duplicate)"
  rej[$tag]="$(chaos_servers_metric tessera_pushes_total rejected)"
  ver[$tag]="$(chaos_servers_metric tessera_shard_version)"
  retries[$tag]=$(cat "$CHAOS_WORK"/worker-*.log | grep -c 'retrying' || true)
  tcp[$tag]=$(tcp_delta "$w1tcp0" "$(tcp_counters w1)")
  s0tcp[$tag]=$(tcp_delta "$s0tcp0" "$(tcp_counters s0)")
  local stalls=()
  if [ -n "$capture" ]; then
    for c in w1-s0 s0 w1-s1 s1; do
      kill -INT "$(chaos_pid "tcpdump-$c")" 2>/dev/null || true
      chaos_wait "tcpdump-$c" 10 || true
      tcpdump -r "$capture/$c.pcap" -tt -nn -S 2>/dev/null > "$capture/$c.txt" || true
    done
    for h in s0 s1; do
      stalls+=("worker 1 -> server ${h#s}: $(/usr/bin/python3 "$here/stalls.py" \
        "$capture/w1-$h.txt" "$capture/$h.txt" --port="$CHAOS_PORT" --side=client 2>&1 || true)")
      stalls+=("server ${h#s} -> worker 1: $(/usr/bin/python3 "$here/stalls.py" \
        "$capture/$h.txt" "$capture/w1-$h.txt" --port="$CHAOS_PORT" --side=server 2>&1 || true)")
    done
  fi
  fault_heal w1
  chaos_stop_servers
  printf '%-6s loss %-5s workers exit %-7s %8.0f samples/s in %ss; shard versions %s; pushes applied %s, duplicate %s, rejected %s; "retrying" lines %s\n' \
    "$tag" "$p" "${rcs[$tag]}" "${sps[$tag]}" "${wall[$tag]}" "${ver[$tag]}" "${applied[$tag]}" \
    "${dup[$tag]}" "${rej[$tag]}" "${retries[$tag]}"
  echo "       worker 1's TCP: ${tcp[$tag]}"
  echo "       server 0's TCP: ${s0tcp[$tag]}"
  for line in "${stalls[@]}"; do echo "       $line"; done
  chaos_archive "run-$tag"
}

echo "== loss: sync Fashion-MNIST, 2 servers, 2 workers, max_steps $max_steps; random drop of the"
echo "   packets between worker 1 and the servers, both ways, at the receiver (iptables -m statistic"
echo "   --mode random in INPUT); worker 1's link carries MTU-sized packets (no GSO) in every run"
run_once base1 0
run_once loss1 0.01
run_once loss5 0.05
run_once base2 0
# Mean of the loss-free runs that finished.
base=$(pyval "(lambda v: sum(v) / len(v) if v else 0)([x for x in (${sps[base1]}, ${sps[base2]}) if x > 0])")
echo
echo "loss-free throughput: ${sps[base1]} and ${sps[base2]} samples/s, mean $(pyval "round($base)")"
r1=$(pyval "round(${sps[loss1]} / $base, 3) if $base > 0 else 0")
r5=$(pyval "round(${sps[loss5]} / $base, 3) if $base > 0 else 0")
echo "1% loss: ${sps[loss1]} samples/s = $(pyval "round(100 * $r1, 1)")% of loss-free (figure: >= 90%)"
echo "5% loss: ${sps[loss5]} samples/s = $(pyval "round(100 * $r5, 1)")% of loss-free (figure: >= 50%)"
echo

exact() {  # tag: every step applied once per worker (but backups) on each shard, nothing else
  local want=$(((2 - backup) * max_steps))
  [ "${ver[$1]}" = "$max_steps $max_steps" ] && [ "${applied[$1]}" = "$want $want" ] &&
    [ "${dup[$1]}" = "0 0" ] && [ "${rej[$1]}" = "0 0" ]
}
for t in base1 base2; do
  chaos_expect "loss-free run $t: both workers exit 0 (${rcs[$t]})" '[ "${rcs[$t]}" = "0 0" ]'
done
for t in loss1 loss5; do
  chaos_expect "$t: 0 failed steps, both workers exit 0 and finish $max_steps steps (exit ${rcs[$t]})" \
    '[ "${rcs[$t]}" = "0 0" ]'
  chaos_expect "$t: exact update count, each shard at version $max_steps with $(((2 - backup) * max_steps)) applied pushes, 0 duplicate, 0 rejected (versions ${ver[$t]}; applied ${applied[$t]}; duplicate ${dup[$t]}; rejected ${rej[$t]})" \
    'exact "$t"'
done
chaos_expect "throughput at 1% loss >= 90% of loss-free (figure): $(pyval "round(100 * $r1, 1)")%" \
  'pytrue "$r1 >= 0.90"'
chaos_expect "throughput at 5% loss >= 50% of loss-free (figure): $(pyval "round(100 * $r5, 1)")%" \
  'pytrue "$r5 >= 0.50"'
chaos_finish
