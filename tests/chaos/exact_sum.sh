#!/usr/bin/env bash
# The exact-sum oracle of RELIABILITY.md through the real servers under
# network faults. Two exact-sum workers (exact_sum_client.py, one per worker
# namespace) push a gradient of 1.0 in every element for steps 0..N-1 to
# both shards of an ASYNC job with SGD at learning rate 1, so each applied
# push lowers every parameter by exactly 1 and the change of a shard's
# param_sum (ShardStats over gRPC) divided by its element count is the
# number of applied pushes. Meanwhile: worker 0 partitioned from both
# servers, 5% random loss on worker 1, TCP resets on worker 0, and a one-way
# partition that drops the servers' replies to worker 1 (pushes applied,
# acknowledgements lost, so the resend must be recognised as a duplicate).
#
# Figures: lost updates = expected - applied = 0; double applies = applied -
# acknowledged = 0 (every step of every worker is acknowledged once the
# workers finish); the servers' own pushes_applied agrees with the sum;
# failed calls return within deadline + 1 s (the exact-sum worker's deadline).
#
# Usage: exact_sum.sh [BIN_DIR [SOURCE_DIR]]
#   env: STEPS (600 per worker), SUBNET (169.254.81), CHAOS_KEEP_LOGS=DIR.
# Needs /usr/bin/python3 with grpc (Debian python3-grpcio) and protobuf
# (python3-protobuf), and protoc; exits 77 without them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 1 ] && CHAOS_BIN=$1
[ $# -ge 2 ] && CHAOS_SRC=$2
source "$here/lib.sh"

steps=${STEPS:-600}
deadline_s=3
if ! /usr/bin/python3 -c "import grpc, google.protobuf" 2>/dev/null; then
  echo "SKIP: /usr/bin/python3 lacks grpc or protobuf (apt-get install python3-grpcio python3-protobuf)"
  exit 77
fi
if ! command -v protoc > /dev/null; then
  echo "SKIP: protoc is missing (apt-get install protobuf-compiler)"; exit 77
fi
chaos_init exact_sum "${SUBNET:-169.254.81}"
chaos_hosts s0 s1 w0 w1
s0=$(chaos_ip s0)
s1=$(chaos_ip s1)

mkdir -p "$CHAOS_WORK/pb"
protoc -I "$CHAOS_SRC/proto" --python_out="$CHAOS_WORK/pb" "$CHAOS_SRC/proto/tessera.proto"
job="$CHAOS_WORK/exact_sum.textproto"
cat > "$job" <<'EOF'
name: "exact-sum"
model: "linear:100-10"
loss: MEAN_SQUARED_ERROR
data {
  format: SYNTHETIC_REGRESSION
  num_samples: 1000
  validation_fraction: 0.2
}
optimizer {
  type: SGD
  learning_rate: 1
}
consistency {
  mode: ASYNC
  barrier_timeout_ms: 60000
}
batch_size: 16
epochs: 1
num_shards: 2
num_workers: 2
seed: 1
block_bytes: 400
EOF

client=(/usr/bin/python3 "$here/exact_sum_client.py" --pb_dir="$CHAOS_WORK/pb" --job="$job"
        --servers="$s0:$CHAOS_PORT,$s1:$CHAOS_PORT" --deadline_s="$deadline_s" --interval_s=0.03)
stats() { chaos_in s0 "${client[@]}" --stats; }

echo "== exact_sum: ASYNC, SGD lr 1, 2 shards, 2 exact-sum workers x $steps steps of +1.0 gradients"
chaos_start_servers "$job"
before=$(stats)
t0=$(now_s)
chaos_spawn w0 client-0 "${client[@]}" --worker=0 --steps="$steps" --out="$CHAOS_WORK/client-0.json"
chaos_spawn w1 client-1 "${client[@]}" --worker=1 --steps="$steps" --out="$CHAOS_WORK/client-1.json"

at() {  # wait until T seconds after the start
  while pytrue "$(now_s) - $t0 < $1"; do sleep 0.2; done
}
at 2;  fault_partition w0 s0 s1; chaos_log "worker 0 partitioned from both servers"
at 7;  fault_heal w0;                 chaos_log "healed"
at 8;  fault_loss w1 0.05 s0 s1;      chaos_log "5% random loss on worker 1"
at 13; fault_heal w1;                 chaos_log "healed"
at 14; fault_reset w0 s0 s1;          chaos_log "TCP resets on worker 0"
at 16; fault_heal w0;                 chaos_log "healed"
at 17; fault_oneway w1 in s0 s1; chaos_log "servers' replies to worker 1 dropped"
at 21; fault_heal w1;                 chaos_log "healed"

rc0=0; chaos_wait client-0 150 || rc0=$?
rc1=0; chaos_wait client-1 150 || rc1=$?
after=$(stats)
chaos_stop_servers
echo "exact-sum workers exit $rc0 $rc1"
for r in 0 1; do
  echo "worker $r: $(cat "$CHAOS_WORK/client-$r.json" 2>/dev/null || tail -n 3 "$CHAOS_WORK/client-$r.log")"
done

report=$(/usr/bin/python3 - "$before" "$after" "$CHAOS_WORK/client-0.json" "$CHAOS_WORK/client-1.json" \
  "$steps" "$deadline_s" <<'EOF'
import json, sys
before, after = json.loads(sys.argv[1]), json.loads(sys.argv[2])
clients = []
for p in sys.argv[3:5]:
    try: clients.append(json.load(open(p)))
    except (OSError, ValueError): clients.append(None)
steps, deadline = int(sys.argv[5]), float(sys.argv[6])
ok = True
for b, a in zip(before, after):
    s = a["shard"]
    elements = a["param_bytes"] // 4
    delta = (b["param_sum"] - a["param_sum"]) / elements
    applied = round(delta)
    exact = abs(delta - applied) < 1e-3
    expected = steps * len(clients)
    acked = sum(c["acknowledged"][s] for c in clients if c)
    acked_dup = sum(c["acked_duplicate"][s] for c in clients if c)
    counter = a["pushes_applied"] - b["pushes_applied"]
    lost, double = expected - applied, applied - acked
    good = exact and lost == 0 and double == 0 and counter == applied
    ok &= good
    print(f"shard {s}: {elements} elements, param_sum {b['param_sum']:.4f} -> {a['param_sum']:.4f}, "
          f"applied by the sum {delta:.4f} = {applied}; expected {expected}, acknowledged {acked} "
          f"({acked_dup} of them as duplicates after a lost reply); pushes_applied counter {counter}, "
          f"pushes_duplicate {a['pushes_duplicate'] - b['pushes_duplicate']}, "
          f"rejected {a['requests_rejected'] - b['requests_rejected']}; "
          f"lost {lost}, double applies {double}")
mx = max((c["max_failed_call_s"] for c in clients if c), default=-1)
n = sum(c["failed_calls"] for c in clients if c)
retries = sum(c["retries"] for c in clients if c)
print(f"SUMMARY {1 if ok else 0} {mx} {n} {retries}")
EOF
)
echo "$report" | grep -v '^SUMMARY'
read -r _ exact_ok max_fail failed_calls retries <<< "$(echo "$report" | grep '^SUMMARY')"
echo "failed calls: $failed_calls, retries $retries, slowest failed call returned after ${max_fail}s (deadline ${deadline_s}s)"
echo
chaos_expect "both exact-sum workers finish every step (exit $rc0 $rc1)" '[ "$rc0 $rc1" = "0 0" ]'
chaos_expect "exact update count (figure): 0 lost, 0 double applies on every shard, counters agree" \
  '[ "$exact_ok" = 1 ]'
chaos_expect "failed calls return within deadline + 1 s (figure): ${max_fail}s <= ${deadline_s} + 1" \
  'pytrue "0 <= $max_fail <= $deadline_s + 1"'
chaos_expect "servers exit 0 on SIGTERM ($CHAOS_SERVER_RCS)" '[ "$CHAOS_SERVER_RCS" = "0 0" ]'
[ "$CHAOS_FAILED" = 0 ] || chaos_dump_logs 12
chaos_finish
