#!/usr/bin/env bash
# Multi-host test: every server and worker in its own network namespace with
# its own address, joined by a bridge in a separate "switch" namespace, started
# with the flags the Kubernetes manifests use (shard from the hostname, rank
# from JOB_COMPLETION_INDEX, servers from a DNS-name pattern resolved through
# a per-namespace hosts file). Trains Fashion-MNIST for one epoch and checks
# the test accuracy, and that every connection of the workers (and of one
# server) carries the retransmission-timeout floor. Everything it creates is
# removed on exit.
#
# Usage: multihost_netns_test.sh BIN_DIR SOURCE_DIR
# Exit 77 (CTest's skip code) only when the machine forbids namespaces.
set -euo pipefail

bin_dir=$1
src_dir=$2
id="t$$"
subnet="169.254.77"   # link-local: exists only inside these namespaces
sw="${id}-sw"
hosts=(s0 s1 w0 w1)
work=$(mktemp -d)

cleanup() {
  set +e
  for p in $(jobs -p); do kill -9 "$p" 2>/dev/null; done
  wait 2>/dev/null
  for h in "${hosts[@]}"; do
    ip netns pids "${id}-${h}" 2>/dev/null | xargs -r kill -9 2>/dev/null
    ip netns del "${id}-${h}" 2>/dev/null
    rm -rf "/etc/netns/${id}-${h}"
  done
  ip netns del "$sw" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

if [ "$(id -u)" != 0 ] || ! ip netns add "$sw" 2>"$work/err"; then
  echo "SKIP: network namespaces are not available here: $(cat "$work/err" 2>/dev/null)"
  exit 77
fi
ip -n "$sw" link add br0 type bridge
ip -n "$sw" link set br0 up

n=1
for h in "${hosts[@]}"; do
  ns="${id}-${h}"
  ip netns add "$ns"
  ip link add "${id}${h}a" type veth peer name "${id}${h}b"
  ip link set "${id}${h}a" netns "$ns"
  ip link set "${id}${h}b" netns "$sw"
  ip -n "$sw" link set "${id}${h}b" master br0 up
  ip -n "$ns" addr add "${subnet}.${n}/24" dev "${id}${h}a"
  ip -n "$ns" link set "${id}${h}a" up
  ip -n "$ns" link set lo up
  # `ip netns exec` mounts /etc/netns/NS/hosts over /etc/hosts: the servers'
  # names resolve as a headless Service's pod names do.
  mkdir -p "/etc/netns/${ns}"
  {
    echo "127.0.0.1 localhost"
    echo "${subnet}.1 tessera-server-0.tessera-server"
    echo "${subnet}.2 tessera-server-1.tessera-server"
  } > "/etc/netns/${ns}/hosts"
  n=$((n + 1))
done

job="$src_dir/examples/fashion_mnist_mlp.textproto"
common=(--job="$job" --epochs=1)

# Servers: the shard comes from the hostname, as in the StatefulSet.
for s in 0 1; do
  ip netns exec "${id}-s${s}" unshare --uts sh -c \
    "hostname tessera-server-${s} && exec '$bin_dir/tessera-server' ${common[*]} \
       --shard_from_hostname --listen=0.0.0.0:7070 \
       --coordinator=tessera-server-0.tessera-server:7070" \
    > "$work/server-${s}.log" 2>&1 &
done

# Wait until both servers answer SERVING from a worker's namespace.
deadline=$((SECONDS + 30))
for s in 0 1; do
  until ip netns exec "${id}-w0" "$bin_dir/tessera" health \
      "tessera-server-${s}.tessera-server:7070" > /dev/null 2>&1; do
    if [ $SECONDS -gt $deadline ]; then
      echo "FAIL: server ${s} never became SERVING"; cat "$work/server-${s}.log"; exit 1
    fi
    sleep 0.2
  done
done
echo "both servers SERVING across namespaces"

# Workers: the rank comes from JOB_COMPLETION_INDEX, the servers from a pattern.
pids=()
for r in 0 1; do
  ip netns exec "${id}-w${r}" env JOB_COMPLETION_INDEX=$r "$bin_dir/tessera-worker" \
    "${common[@]}" --rank_from_env=JOB_COMPLETION_INDEX \
    --server_pattern='tessera-server-{i}.tessera-server:7070' \
    --summary_json="$work/summary-${r}.json" > "$work/worker-${r}.log" 2>&1 &
  pids+=($!)
done

# Every TCP connection of a worker (its shard sessions and its coordinator
# channel) and of a server carries the retransmission-timeout floor that
# servers and workers set (--tcp_rto_min_us, default 5000 us, 8 ms at
# HZ=250): `ss` shows the timer as rto:MS, and the system's floor as 200 or
# more. Sampled while the workers train, once worker 0 holds its three.
rto_of() {  # namespace -> the rto of each of its established connections
  ip netns exec "$1" ss -tin state established 2>/dev/null |
    grep -o 'rto:[0-9.]*' | cut -d: -f2 | tr '\n' ' ' || true
}
rto_w0="" rto_w1="" rto_s1=""
deadline=$((SECONDS + 60))
while [ $SECONDS -lt $deadline ] && kill -0 "${pids[0]}" 2>/dev/null; do
  rto_w0=$(rto_of "${id}-w0"); rto_w1=$(rto_of "${id}-w1"); rto_s1=$(rto_of "${id}-s1")
  [ "$(wc -w <<< "$rto_w0")" -ge 3 ] && break
  sleep 0.1
done
echo "retransmission timers (ms) of the established connections: worker 0: $rto_w0; worker 1: $rto_w1; server 1: $rto_s1"
rto_bad=$(python3 -c "import sys; w = sys.argv[1].split()
print('worker 0 held %d connections (2 shard sessions and the coordinator expected)' % len(w) if len(w) < 3 else
      ' '.join(r for a in sys.argv[1:] for r in a.split() if float(r) >= 200))" \
  "$rto_w0" "$rto_w1" "$rto_s1")
if ! python3 -c "import re, os, sys
sys.exit(0 if tuple(map(int, re.match(r'(\d+)\.(\d+)', os.uname().release).groups())) >= (6, 15) else 1)"; then
  echo "(the per-socket floor needs Linux 6.15 or later; this is $(uname -r): not checked)"
elif [ -n "$rto_bad" ]; then
  echo "FAIL: a connection without the retransmission-timeout floor: $rto_bad"; exit 1
fi

status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
cat "$work/worker-0.log"
if [ $status != 0 ]; then
  echo "FAIL: a worker failed"; tail -20 "$work"/worker-1.log "$work"/server-*.log; exit 1
fi

acc=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['test_accuracy'])" \
  "$work/summary-0.json")
echo "test_accuracy after 1 epoch across namespaces: $acc"
python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) >= 0.80 else 1)" "$acc" || {
  echo "FAIL: accuracy $acc below 0.80"; exit 1; }

# The servers exit 0 on SIGTERM.
for s in 0 1; do
  ip netns pids "${id}-s${s}" | xargs -r kill -TERM
done
for j in $(jobs -p); do
  if ! timeout 15 tail --pid="$j" -f /dev/null; then echo "FAIL: server did not stop"; exit 1; fi
done
echo "multihost: 1 passed, 0 failed"
