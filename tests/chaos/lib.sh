# Helpers for the network-fault scenarios in tests/chaos/ (source this file).
#
# Every "host" is a network namespace with one veth into a bridge that lives
# in a separate switch namespace; hosts get link-local addresses SUBNET.1,
# SUBNET.2, ... that exist only inside these namespaces. Faults are applied
# inside a host's own namespace (iptables, ip link, tc tbf), so nothing
# outside the namespaces created here is touched. chaos_init installs an
# EXIT trap that kills every process started here (by id), removes every
# rule and qdisc added, and deletes the namespaces.
#
#   chaos_init NAME SUBNET          e.g. chaos_init partition 169.254.78
#   chaos_hosts s0 s1 w0 w1         hosts get SUBNET.1, .2, ... in that order;
#                                   the links of hosts in CHAOS_MTU_PACKETS
#                                   ("w1 s0" or "all") carry MTU-sized
#                                   packets (no GSO batching)
#   chaos_ip w0                     -> 169.254.78.3
#   chaos_in w0 CMD...              run CMD inside w0's namespace
#   chaos_spawn w0 NAME CMD...      start CMD in w0 in the background; its
#                                   output, each line prefixed with the epoch
#                                   time, goes to $CHAOS_WORK/NAME.log
#   chaos_start_servers JOB FLAGS.. shards 0..N-1 on hosts s0..sN-1 (port 7070,
#                                   metrics on 9464), waits until SERVING
#   chaos_start_worker HOST RANK JOB FLAGS...   (metrics on 9464 in HOST)
#   chaos_alive NAME                true while a spawned process runs
#   chaos_wait_workers LIMIT_S INTERVAL [CMD...]  run CMD every INTERVAL s
#                                   while worker-0/1 run; sets rc0 and rc1
#   chaos_wait NAME SECONDS         wait for a spawned process; returns its
#                                   exit status, 124 on timeout
#   chaos_metrics HOST [PORT]       /metrics text of the process in HOST
#   chaos_metric HOST NAME [LABEL_SUBSTRING] [PORT]  sum of matching samples
#   fault_partition HOST [PEER...]  drop everything between HOST and the
#                                   peer hosts (at the receivers), or without
#                                   peers everything in and out (except lo)
#   fault_oneway HOST in|out [PEER...]
#   fault_loss HOST PROB [PEER...]  random loss, both directions
#   fault_reset HOST [PEER...]      answer HOST's TCP with a reset
#   fault_heal HOST                 remove every rule of HOST's faults
#   fault_link HOST down|up
#   fault_rate HOST RATE            tbf cap both ways on HOST's link (e.g. 20mbit)
#   fault_rate_clear HOST
#   now_s                           epoch seconds with microseconds
#
# Scripts print figures, "PASS ..." / "FAIL ..." lines and end with
# chaos_finish, which prints "NAME: N passed, N failed" and exits 0 only
# when nothing failed.

CHAOS_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHAOS_SRC=${CHAOS_SRC:-$(cd "$CHAOS_LIB_DIR/../.." && pwd)}
CHAOS_BIN=${CHAOS_BIN:-$CHAOS_SRC/build/bin}
CHAOS_PORT=7070
CHAOS_METRICS_PORT=9464
CHAOS_PASSED=0
CHAOS_FAILED=0

declare -a CHAOS_HOSTS=()
declare -A CHAOS_HOST_IP=()
declare -A CHAOS_PID=()
declare -A CHAOS_RULES=()   # owner -> newline-separated "host chain spec..."
declare -A CHAOS_QDISC=()   # host -> 1 when a tbf is installed

now_s() { printf '%s\n' "$EPOCHREALTIME"; }

chaos_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

chaos_pass() { echo "PASS $*"; CHAOS_PASSED=$((CHAOS_PASSED + 1)); }
chaos_fail() { echo "FAIL $*"; CHAOS_FAILED=$((CHAOS_FAILED + 1)); }
# chaos_expect TEXT CONDITION: PASS or FAIL by the status of CONDITION (a
# shell command line, evaluated), e.g. chaos_expect "..." '[ "$x" -le 5 ]'.
chaos_expect() {
  if eval "$2"; then chaos_pass "$1"; else chaos_fail "$1"; fi
}

chaos_finish() {
  echo "$CHAOS_NAME: $CHAOS_PASSED passed, $CHAOS_FAILED failed"
  [ "$CHAOS_FAILED" = 0 ]
  exit $?
}

# Float arithmetic and comparisons through Python: pyval 'EXPR' prints the
# value, pytrue 'EXPR' succeeds when it is true.
pyval() { /usr/bin/python3 -c "import sys; print($1)"; }
pytrue() { /usr/bin/python3 -c "import sys; sys.exit(0 if ($1) else 1)"; }

chaos_ns() { echo "${CHAOS_ID}-$1"; }
chaos_ip() { echo "${CHAOS_HOST_IP[$1]}"; }
chaos_if() { echo "${CHAOS_ID}${1}a"; }      # host side of HOST's veth
chaos_swif() { echo "${CHAOS_ID}${1}b"; }    # switch side

chaos_cleanup() {
  set +e
  local name pid h
  for name in "${!CHAOS_PID[@]}"; do
    pid=${CHAOS_PID[$name]}
    kill -9 "$pid" 2>/dev/null
  done
  for name in "${!CHAOS_PID[@]}"; do
    wait "${CHAOS_PID[$name]}" 2>/dev/null
  done
  for h in "${CHAOS_HOSTS[@]}"; do
    fault_heal "$h" 2>/dev/null
    fault_rate_clear "$h" 2>/dev/null
    # Anything still running in the namespace was started from here.
    for pid in $(ip netns pids "$(chaos_ns "$h")" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    ip netns del "$(chaos_ns "$h")" 2>/dev/null
  done
  if [ -n "${CHAOS_ID:-}" ]; then
    ip netns del "${CHAOS_ID}-sw" 2>/dev/null
  fi
  if [ -n "${CHAOS_WORK:-}" ] && [ -d "$CHAOS_WORK" ]; then
    if [ -n "${CHAOS_KEEP_LOGS:-}" ]; then
      mkdir -p "$CHAOS_KEEP_LOGS" && cp -r "$CHAOS_WORK"/. "$CHAOS_KEEP_LOGS"/ 2>/dev/null
      rm -rf "$CHAOS_KEEP_LOGS/bin"
    fi
    rm -rf "$CHAOS_WORK"
  fi
}

# chaos_init NAME SUBNET: checks the machine, sets the trap, makes the switch.
# Exits 77 where namespaces, iptables or the binaries are missing.
chaos_init() {
  CHAOS_NAME=$1
  CHAOS_SUBNET=$2
  CHAOS_ID="c$$"
  CHAOS_WORK=$(mktemp -d "/tmp/tessera-chaos-${CHAOS_NAME}-XXXXXX")
  trap chaos_cleanup EXIT
  trap 'exit 130' INT TERM
  local b
  for b in tessera-server tessera-worker tessera; do
    if [ ! -x "$CHAOS_BIN/$b" ]; then
      echo "SKIP: $CHAOS_BIN/$b is missing (build first)"; exit 77
    fi
  done
  # Work on a copy of the binaries: a rebuild of build/bin during the run
  # must not mix versions (servers and workers refuse each other then).
  mkdir -p "$CHAOS_WORK/bin"
  for b in tessera-server tessera-worker tessera; do cp "$CHAOS_BIN/$b" "$CHAOS_WORK/bin/"; done
  CHAOS_BIN="$CHAOS_WORK/bin"
  if [ "$(id -u)" != 0 ]; then echo "SKIP: needs root for network namespaces"; exit 77; fi
  for b in ip iptables tc; do
    if ! command -v "$b" > /dev/null; then
      echo "SKIP: '$b' is not installed (apt-get install iproute2 iptables)"; exit 77
    fi
  done
  if ! ip netns add "${CHAOS_ID}-sw" 2> "$CHAOS_WORK/err"; then
    echo "SKIP: network namespaces are not available here: $(cat "$CHAOS_WORK/err")"; exit 77
  fi
  ip -n "${CHAOS_ID}-sw" link add br0 type bridge
  ip -n "${CHAOS_ID}-sw" link set br0 up
  # iptables must work inside a namespace (nft backend on bookworm).
  if ! ip netns exec "${CHAOS_ID}-sw" iptables -A INPUT -m statistic --mode random \
      --probability 0.5 -j ACCEPT 2> "$CHAOS_WORK/err"; then
    echo "SKIP: iptables does not work inside a namespace: $(cat "$CHAOS_WORK/err")"; exit 77
  fi
  ip netns exec "${CHAOS_ID}-sw" iptables -F INPUT
}

chaos_hosts() {
  local h ns n=$((${#CHAOS_HOSTS[@]} + 1))
  for h in "$@"; do
    ns=$(chaos_ns "$h")
    ip netns add "$ns"
    ip link add "$(chaos_if "$h")" type veth peer name "$(chaos_swif "$h")"
    ip link set "$(chaos_if "$h")" netns "$ns"
    ip link set "$(chaos_swif "$h")" netns "${CHAOS_ID}-sw"
    ip -n "${CHAOS_ID}-sw" link set "$(chaos_swif "$h")" master br0 up
    ip -n "$ns" addr add "${CHAOS_SUBNET}.${n}/24" dev "$(chaos_if "$h")"
    # Hosts named in CHAOS_MTU_PACKETS ("all" for every host): their link
    # carries one MTU-sized packet per skb, both ways (no 64 KiB GSO
    # batches), so that random drops hit packets as a real link carries
    # them. Costs CPU (about 40 times the packets through iptables).
    if [ "${CHAOS_MTU_PACKETS:-}" = all ] || [[ " ${CHAOS_MTU_PACKETS:-} " == *" $h "* ]]; then
      ip -n "$ns" link set dev "$(chaos_if "$h")" gso_max_segs 1
      ip -n "${CHAOS_ID}-sw" link set dev "$(chaos_swif "$h")" gso_max_segs 1
    fi
    ip -n "$ns" link set "$(chaos_if "$h")" up
    ip -n "$ns" link set lo up
    CHAOS_HOSTS+=("$h")
    CHAOS_HOST_IP[$h]="${CHAOS_SUBNET}.${n}"
    n=$((n + 1))
  done
}

chaos_in() {
  local h=$1; shift
  ip netns exec "$(chaos_ns "$h")" "$@"
}

_chaos_stamp() {
  local line
  while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "$line"; done
}

chaos_spawn() {
  local h=$1 name=$2; shift 2
  ip netns exec "$(chaos_ns "$h")" "$@" > >(_chaos_stamp > "$CHAOS_WORK/$name.log") 2>&1 &
  CHAOS_PID[$name]=$!
}

chaos_pid() { echo "${CHAOS_PID[$1]}"; }
# True while the spawned process NAME runs (not exited, not a zombie).
chaos_alive() { kill -0 "$(chaos_pid "$1")" 2>/dev/null && [ "$(ps -o stat= -p "$(chaos_pid "$1")" | cut -c1)" != Z ]; }

# While worker-0 or worker-1 runs, for at most LIMIT_S seconds, runs CMD (if
# any) every INTERVAL seconds; then sets rc0 and rc1 to the workers' exit
# statuses (124: still running at the limit, then killed).
chaos_wait_workers() {
  local limit=$1 interval=$2
  shift 2
  local deadline=$((SECONDS + limit))
  while chaos_alive worker-0 || chaos_alive worker-1; do
    if [ $# -gt 0 ]; then "$@"; fi
    [ $SECONDS -gt $deadline ] && break
    sleep "$interval"
  done
  rc0=0; chaos_wait worker-0 1 || rc0=$?
  rc1=0; chaos_wait worker-1 1 || rc1=$?
  if [ "$rc0" = 124 ]; then kill -9 "$(chaos_pid worker-0)" 2>/dev/null || true; fi
  if [ "$rc1" = 124 ]; then kill -9 "$(chaos_pid worker-1)" 2>/dev/null || true; fi
  return 0
}

# chaos_wait NAME SECONDS: the exit status of a spawned process, 124 when it
# is still running after SECONDS.
chaos_wait() {
  local name=$1 limit=$2 pid=${CHAOS_PID[$1]} start=$SECONDS rc
  while kill -0 "$pid" 2>/dev/null; do
    if [ $((SECONDS - start)) -ge "$limit" ]; then return 124; fi
    # A finished process stays a zombie until waited for, so kill -0 can't see it end.
    if [ "$(ps -o stat= -p "$pid" 2>/dev/null | cut -c1)" = Z ]; then break; fi
    sleep 0.2
  done
  rc=0
  wait "$pid" || rc=$?
  return $rc
}

# chaos_start_servers JOB FLAGS...: shard s on host s$s, all of the hosts
# named s0, s1, ... in chaos_hosts order. Waits up to 30 s for SERVING.
chaos_start_servers() {
  local job=$1; shift
  local s=0 coord
  coord="$(chaos_ip s0):$CHAOS_PORT"
  CHAOS_SERVERS=""
  while [ -n "${CHAOS_HOST_IP[s$s]:-}" ]; do
    local extra=()
    [ "$s" != 0 ] && extra=(--coordinator="$coord")
    chaos_spawn "s$s" "server-$s" "$CHAOS_BIN/tessera-server" --job="$job" --shard="$s" \
      --listen="0.0.0.0:$CHAOS_PORT" --advertise="$(chaos_ip "s$s"):$CHAOS_PORT" \
      --metrics_listen="0.0.0.0:$CHAOS_METRICS_PORT" "${extra[@]}" "$@"
    CHAOS_SERVERS="${CHAOS_SERVERS:+$CHAOS_SERVERS,}$(chaos_ip "s$s"):$CHAOS_PORT"
    s=$((s + 1))
  done
  CHAOS_NUM_SERVERS=$s
  local deadline=$((SECONDS + 30)) i
  for ((i = 0; i < s; i++)); do
    until chaos_in s0 "$CHAOS_BIN/tessera" health "$(chaos_ip "s$i"):$CHAOS_PORT" > /dev/null 2>&1; do
      if [ $SECONDS -gt $deadline ]; then
        echo "FAIL: server $i never became SERVING"; cat "$CHAOS_WORK/server-$i.log"; exit 1
      fi
      sleep 0.2
    done
  done
}

# chaos_start_worker HOST RANK JOB FLAGS...: log $CHAOS_WORK/worker-RANK.log,
# summary $CHAOS_WORK/summary-RANK.json.
chaos_start_worker() {
  local h=$1 r=$2 job=$3; shift 3
  chaos_spawn "$h" "worker-$r" "$CHAOS_BIN/tessera-worker" --job="$job" --rank="$r" \
    --servers="$CHAOS_SERVERS" --metrics_listen="0.0.0.0:$CHAOS_METRICS_PORT" \
    --summary_json="$CHAOS_WORK/summary-$r.json" "$@"
}

chaos_metrics() {
  local h=$1 port=${2:-$CHAOS_METRICS_PORT}
  if command -v curl > /dev/null; then
    chaos_in "$h" curl -s -m 2 "http://127.0.0.1:$port/metrics" || true
  else
    chaos_in "$h" /usr/bin/python3 -c "import urllib.request,sys
sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:$port/metrics', timeout=2).read().decode())" \
      2>/dev/null || true
  fi
}

# chaos_metric HOST NAME [LABEL_SUBSTRING] [PORT]: sum of the samples of NAME
# (exact name, any labels containing LABEL_SUBSTRING); empty when unreachable.
chaos_metric() {
  local h=$1 name=$2 label=${3:-} port=${4:-}
  chaos_metrics "$h" $port 2>/dev/null | awk -v n="$name" -v l="$label" '
    /^#/ { next }
    { split($1, a, "{"); if (a[1] != n) next; if (l != "" && index($1, l) == 0) next;
      s += $NF; found = 1 }
    END { if (found) printf "%.17g\n", s }' || true
}

# chaos_servers_metric NAME [LABEL_SUBSTRING]: chaos_metric of every server
# (s0, s1, ...), space-separated in shard order ("" for one unreachable).
chaos_servers_metric() {
  local s vals=()
  for ((s = 0; s < CHAOS_NUM_SERVERS; s++)); do vals+=("$(chaos_metric "s$s" "$@")"); done
  local IFS=' '
  echo "${vals[*]}"
}

# chaos_summary RANK FIELD: a field of worker RANK's --summary_json.
chaos_summary() {
  /usr/bin/python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" \
    "$CHAOS_WORK/summary-$1.json" "$2" 2>/dev/null || true
}

# Rules are recorded under the host whose fault they make ("owner") with the
# namespace they live in, so that fault_heal OWNER removes exactly them.
_chaos_rule() {  # owner host-of-namespace chain spec...
  local owner=$1 h=$2; shift 2
  chaos_in "$h" iptables -A "$@"
  CHAOS_RULES[$owner]+="$h $*"$'\n'
}

# Faults between HOST and named peer hosts drop packets where a real link
# loses them: at the receiver (INPUT of HOST for what the peers send, INPUT
# of each peer for what HOST sends), so no sender sees a local error. Without
# peers, HOST's own INPUT and OUTPUT chains are used (everything but lo);
# a packet dropped in OUTPUT fails the local send (EPERM), which a real link
# never does.
fault_partition() {
  local h=$1 p; shift
  if [ $# = 0 ]; then
    _chaos_rule "$h" "$h" INPUT ! -i lo -j DROP
    _chaos_rule "$h" "$h" OUTPUT ! -o lo -j DROP
  else
    for p in "$@"; do
      _chaos_rule "$h" "$h" INPUT -s "$(chaos_ip "$p")" -j DROP
      _chaos_rule "$h" "$p" INPUT -s "$(chaos_ip "$h")" -j DROP
    done
  fi
}

# fault_oneway HOST in|out [PEER...]: "in" loses what reaches HOST, "out"
# what HOST sends.
fault_oneway() {
  local h=$1 dir=$2 p; shift 2
  if [ $# = 0 ]; then
    if [ "$dir" = in ]; then _chaos_rule "$h" "$h" INPUT ! -i lo -j DROP
    else _chaos_rule "$h" "$h" OUTPUT ! -o lo -j DROP; fi
  else
    for p in "$@"; do
      if [ "$dir" = in ]; then _chaos_rule "$h" "$h" INPUT -s "$(chaos_ip "$p")" -j DROP
      else _chaos_rule "$h" "$p" INPUT -s "$(chaos_ip "$h")" -j DROP; fi
    done
  fi
}

# fault_loss HOST PROBABILITY [PEER...]: each packet between HOST and its
# peers (or, without peers, every packet in or out of HOST) is dropped with
# the probability, independently, in both directions.
fault_loss() {
  local h=$1 prob=$2 p; shift 2
  local rnd=(-m statistic --mode random --probability "$prob" -j DROP)
  if [ $# = 0 ]; then
    _chaos_rule "$h" "$h" INPUT ! -i lo "${rnd[@]}"
    _chaos_rule "$h" "$h" OUTPUT ! -o lo "${rnd[@]}"
  else
    for p in "$@"; do
      _chaos_rule "$h" "$h" INPUT -s "$(chaos_ip "$p")" "${rnd[@]}"
      _chaos_rule "$h" "$p" INPUT -s "$(chaos_ip "$h")" "${rnd[@]}"
    done
  fi
}

# fault_reset HOST [PEER...]: HOST's TCP packets (to the peers) are answered
# with a reset, which breaks HOST's connections at once.
fault_reset() {
  local h=$1 p; shift
  if [ $# = 0 ]; then
    _chaos_rule "$h" "$h" OUTPUT ! -o lo -p tcp -j REJECT --reject-with tcp-reset
  else
    for p in "$@"; do
      _chaos_rule "$h" "$h" OUTPUT -d "$(chaos_ip "$p")" -p tcp -j REJECT --reject-with tcp-reset
    done
  fi
}

fault_heal() {
  local owner=$1 rule h
  local -a spec
  while IFS= read -r rule; do
    [ -z "$rule" ] && continue
    read -r -a spec <<< "$rule"
    h=${spec[0]}
    chaos_in "$h" iptables -D "${spec[@]:1}" 2>/dev/null || true
  done <<< "${CHAOS_RULES[$owner]:-}"
  CHAOS_RULES[$owner]=""
}

fault_link() {
  chaos_in "$1" ip link set dev "$(chaos_if "$1")" "$2"
}

# tbf on both ends of HOST's veth: the host's egress and the switch's egress
# toward the host.
fault_rate() {
  local h=$1 rate=$2
  chaos_in "$h" tc qdisc replace dev "$(chaos_if "$h")" root tbf rate "$rate" \
    burst 32kbit latency 200ms
  ip netns exec "${CHAOS_ID}-sw" tc qdisc replace dev "$(chaos_swif "$h")" root tbf \
    rate "$rate" burst 32kbit latency 200ms
  CHAOS_QDISC[$h]=1
}

fault_rate_clear() {
  local h=$1
  [ -n "${CHAOS_QDISC[$h]:-}" ] || return 0
  chaos_in "$h" tc qdisc del dev "$(chaos_if "$h")" root 2>/dev/null || true
  ip netns exec "${CHAOS_ID}-sw" tc qdisc del dev "$(chaos_swif "$h")" root 2>/dev/null || true
  CHAOS_QDISC[$h]=""
}

# Lines of a spawned process's log matching a pattern, with their time.
chaos_grep() { grep -E "$2" "$CHAOS_WORK/$1.log" 2>/dev/null || true; }

# Tail of each log, for failures.
chaos_dump_logs() {
  local f
  for f in "$CHAOS_WORK"/*.log; do
    echo "--- ${f##*/} (last ${1:-15} lines)"
    tail -n "${1:-15}" "$f" | cut -c1-300
  done
}

# chaos_stop_servers [SECONDS]: SIGTERM every server, wait for each (default
# 30 s); sets CHAOS_SERVER_RCS to their exit statuses ("0 0" when clean).
chaos_stop_servers() {
  local limit=${1:-30} s rc
  CHAOS_SERVER_RCS=""
  for ((s = 0; s < CHAOS_NUM_SERVERS; s++)); do
    kill -TERM "${CHAOS_PID[server-$s]}" 2>/dev/null || true
  done
  for ((s = 0; s < CHAOS_NUM_SERVERS; s++)); do
    rc=0; chaos_wait "server-$s" "$limit" || rc=$?
    CHAOS_SERVER_RCS+="${CHAOS_SERVER_RCS:+ }$rc"
  done
}

# chaos_archive DIR: move the logs and summaries of the last run into
# $CHAOS_WORK/DIR, so that the next run starts with fresh names.
chaos_archive() {
  mkdir -p "$CHAOS_WORK/$1"
  find "$CHAOS_WORK" -maxdepth 1 -type f \( -name '*.log' -o -name '*.json' \) \
    -exec mv {} "$CHAOS_WORK/$1/" \;
}
