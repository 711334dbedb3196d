#!/usr/bin/env bash
# A private three-node RabbitMQ cluster on this machine, for failover tests and benches: nodes
# deskbridge-c1@localhost, -c2, -c3 with their own ports and data dirs, started the way
# scripts/bench-broker.sh starts the bench node. The machine's broker (5672), the bench node
# (5673) and the tests' private nodes are never touched: every command names our nodes.
#
#   scripts/cluster.sh start          # boot 3 nodes, join c2 and c3 to c1, print the URLs
#   scripts/cluster.sh urls           # amqp://guest:guest@127.0.0.1:5781/%2f,...:5782/%2f,...:5783/%2f
#   scripts/cluster.sh url N          # node N's URL alone
#   scripts/cluster.sh stop-node N    # stop node N's Erlang VM (its clients see the socket close)
#   scripts/cluster.sh kill-node N    # SIGKILL node N (a crash); start-node N brings it back
#   scripts/cluster.sh start-node N   # boot node N again; returns once the cluster has 3 running nodes
#   scripts/cluster.sh leader QUEUE   # N of the node leading a quorum queue or stream
#   scripts/cluster.sh status         # each node's state, and the running nodes
#   scripts/cluster.sh stop           # stop all nodes (if any) and delete the data dir; idempotent
#
# For programs that drive it: stdout carries only the answer (the URLs for start and urls, a
# number for leader); progress and errors go to stderr. Exit status 0 means done, 1 failed (a
# message on stderr says why), 2 usage. Every wait is bounded by CLUSTER_TIMEOUT seconds. A failed
# start stops whatever it had started.
#
# Environment (defaults): CLUSTER_AMQP_PORT (5781; node N listens on +N-1, on 127.0.0.1),
# CLUSTER_DIST_PORT (25781; same rule), CLUSTER_NODE_PREFIX (deskbridge-c), CLUSTER_DIR
# (/tmp/deskbridge-cluster; node N keeps mnesia, log, pid and config in $CLUSTER_DIR/<prefix>N),
# CLUSTER_TIMEOUT (120, the bound on each wait), CLUSTER_STOP_TIMEOUT (60, the bound on one node's
# graceful stop; then SIGTERM, then SIGKILL), CLUSTER_NOFILE (20000, the nodes' fd limit).
#
# All three nodes run as the same user and so share its Erlang cookie: as root, the nodes run as
# `rabbitmq` through su (which sets HOME=/var/lib/rabbitmq) and rabbitmqctl runs as `rabbitmq`
# with that HOME, so the cookie is /var/lib/rabbitmq/.erlang.cookie (the machine broker's too);
# otherwise it is the user's ~/.erlang.cookie.
set -euo pipefail

PREFIX=${CLUSTER_NODE_PREFIX:-deskbridge-c}
BASE=${CLUSTER_DIR:-/tmp/deskbridge-cluster}
AMQP_BASE=${CLUSTER_AMQP_PORT:-5781}
DIST_BASE=${CLUSTER_DIST_PORT:-25781}
TIMEOUT=${CLUSTER_TIMEOUT:-120}
STOP_TIMEOUT=${CLUSTER_STOP_TIMEOUT:-60}
NOFILE=${CLUSTER_NOFILE:-20000}
LAUNCH_GRACE=15
NODES=(1 2 3)
SERVER=/usr/lib/rabbitmq/bin/rabbitmq-server
CTL=$(command -v rabbitmqctl || echo /usr/sbin/rabbitmqctl)
CTL_REAL=/usr/lib/rabbitmq/bin/rabbitmqctl

say() { echo "cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }
usage() {
  echo "usage: $0 start|urls|url N|status|stop-node N|kill-node N|start-node N|leader QUEUE|stop" >&2
  exit 2
}

case "$BASE" in /|"") die "CLUSTER_DIR must name a directory of its own, not '$BASE'" ;; esac
for value in "$AMQP_BASE" "$DIST_BASE" "$TIMEOUT" "$STOP_TIMEOUT" "$NOFILE"; do
  [[ "$value" =~ ^[0-9]+$ ]] || die "not a number: '$value' (CLUSTER_AMQP_PORT, CLUSTER_DIST_PORT, CLUSTER_TIMEOUT, CLUSTER_STOP_TIMEOUT, CLUSTER_NOFILE)"
done

node_name() { echo "$PREFIX$1@localhost"; }
node_dir() { echo "$BASE/$PREFIX$1"; }
amqp_port() { echo $((AMQP_BASE + $1 - 1)); }
dist_port() { echo $((DIST_BASE + $1 - 1)); }
url() { echo "amqp://guest:guest@127.0.0.1:$(amqp_port "$1")/%2f"; }
urls() {
  local list=()
  for n in "${NODES[@]}"; do list+=("$(url "$n")"); done
  (IFS=,; echo "${list[*]}")
}
check_n() { [[ "${1:-}" =~ ^[1-3]$ ]] || usage; }
now() { date +%s.%N | cut -c1-14; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# rabbitmqctl against node N, bounded by CTL_BOUND or CLUSTER_TIMEOUT seconds (each call is a
# whole Erlang VM: ~1 s). As root, Debian's wrapper would run it through `su`, whose child is in a
# session of its own: on a timeout su dies but the CLI's VM lives on, holding our pipes. setpriv
# switches user in place, so `timeout` ends the VM itself; HOME gives it the nodes' cookie.
ctl() {
  local n=$1
  shift
  if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1 && [ -x "$CTL_REAL" ] && command -v setpriv >/dev/null; then
    (cd /var/lib/rabbitmq && HOME=/var/lib/rabbitmq exec timeout "${CTL_BOUND:-$TIMEOUT}" \
      setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
      "$CTL_REAL" -n "$(node_name "$n")" -q "$@")
  else
    timeout "${CTL_BOUND:-$TIMEOUT}" "$CTL" -n "$(node_name "$n")" -q "$@"
  fi
}

# Whether node N's Erlang VM is registered with epmd (up, booting, or with its app stopped).
registered() {
  epmd -names 2>/dev/null | grep "^name $PREFIX$1 at port " >/dev/null
}

listening() {
  if command -v ss >/dev/null; then
    ss -Hltn "sport = :$1" 2>/dev/null | grep . >/dev/null
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

# Node N's OS pid: the beam process whose environment names the node. A booting node has neither
# a pid file nor an epmd entry for its first seconds, so neither can be relied on.
node_pid() {
  local pid
  for pid in $(pgrep -x beam.smp); do
    alive "$pid" || continue
    if grep -qzxF "RABBITMQ_NODENAME=$(node_name "$1")" "/proc/$pid/environ" 2>/dev/null; then
      echo "$pid"
      return 0
    fi
  done
  return 1
}

# Whether a process runs (a zombie does not: detached nodes are children of pid 1, which may
# be slow to reap them).
alive() {
  local state
  state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

log_tail() {
  local log
  log="$(node_dir "$1")/log/$(node_name "$1").log"
  if [ -r "$log" ]; then
    say "last lines of $log:"
    tail -n 20 "$log" >&2
  else
    say "no log at $log"
  fi
}

write_config() {
  local n=$1 dir
  dir=$(node_dir "$n")
  mkdir -p "$dir/mnesia" "$dir/log"
  echo '[].' >"$dir/enabled_plugins"
  cat >"$dir/rabbitmq.conf" <<CONF
listeners.tcp.1 = 127.0.0.1:$(amqp_port "$n")
loopback_users = none
log.console = false
CONF
}

# Starts node N's VM in the background (rabbitmq-server -detached) on its existing data dir.
launch() {
  local n=$1 dir
  dir=$(node_dir "$n")
  [ -f "$dir/rabbitmq.conf" ] || write_config "$n"
  (
    export RABBITMQ_NODENAME RABBITMQ_NODE_PORT RABBITMQ_DIST_PORT RABBITMQ_MNESIA_BASE \
      RABBITMQ_LOG_BASE RABBITMQ_PID_FILE RABBITMQ_ENABLED_PLUGINS_FILE RABBITMQ_CONFIG_FILE
    RABBITMQ_NODENAME=$(node_name "$n")
    RABBITMQ_NODE_PORT=$(amqp_port "$n")
    RABBITMQ_DIST_PORT=$(dist_port "$n")
    RABBITMQ_MNESIA_BASE=$dir/mnesia
    RABBITMQ_LOG_BASE=$dir/log
    RABBITMQ_PID_FILE=$dir/pid
    RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins
    RABBITMQ_CONFIG_FILE=$dir/rabbitmq
    rm -f "$dir/pid"
    # As in bench-broker.sh: Debian's wrapper would `su` to rabbitmq itself, and su's PAM
    # session resets ulimits; so switch user here and raise the fd limit after the switch.
    if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1 && [ -x "$SERVER" ]; then
      chown -R rabbitmq:rabbitmq "$BASE"
      su rabbitmq -s /bin/sh -c \
        "cd /var/lib/rabbitmq && { ulimit -n $NOFILE 2>/dev/null || ulimit -n \$(ulimit -Hn); } && exec $SERVER -detached"
    else
      ulimit -n "$NOFILE" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
      rabbitmq-server -detached
    fi
  ) >&2 || die "rabbitmq-server -detached failed for $(node_name "$n")"
}

# Waits until node N listens on its AMQP port and has finished booting.
await_boot() {
  local n=$1 start deadline seen="" grace
  start=$(now)
  deadline=$((SECONDS + TIMEOUT))
  # `-detached` returns once erlexec has forked, maybe before the child has exec'd beam.smp (a
  # window a busy machine widens): no beam yet means "not started yet" until one was seen or
  # LAUNCH_GRACE has passed.
  grace=$((SECONDS + LAUNCH_GRACE))
  until listening "$(amqp_port "$n")"; do
    if node_pid "$n" >/dev/null; then
      seen=1
    elif [ -n "$seen" ]; then
      log_tail "$n"
      die "$(node_name "$n") died while booting"
    elif [ $SECONDS -ge $grace ]; then
      log_tail "$n"
      die "$(node_name "$n") did not start: no beam.smp process after ${LAUNCH_GRACE}s"
    fi
    if [ $SECONDS -ge $deadline ]; then
      log_tail "$n"
      die "$(node_name "$n") did not listen on $(amqp_port "$n") within ${TIMEOUT}s"
    fi
    sleep 0.2
  done
  ctl "$n" await_startup --timeout "$TIMEOUT" >&2 || { log_tail "$n"; die "$(node_name "$n") did not finish booting"; }
  say "$(node_name "$n") up in $(since "$start") s (amqp $(amqp_port "$n"))"
}

# How many nodes node N sees running (the RabbitMQ app, not just the VM).
running_count() {
  ctl "$1" eval 'length(rabbit_nodes:all_running()).' 2>/dev/null | tr -dc 0-9
}

# Waits until node N sees all three nodes running.
await_cluster() {
  local n=$1 deadline count=""
  deadline=$((SECONDS + TIMEOUT))
  while :; do
    count=$(running_count "$n" || true)
    [ "$count" = "${#NODES[@]}" ] && return 0
    [ $SECONDS -ge $deadline ] && die "$(node_name "$n") sees ${count:-no} running nodes after ${TIMEOUT}s, not ${#NODES[@]}"
    sleep 1
  done
}

# Stops node N's VM if it runs (also while it boots); waits for the OS process to end, with
# SIGTERM and then SIGKILL as last resorts.
halt() {
  local n=$1 pid pidfile out
  pid=$(node_pid "$n" || true)
  if [ -z "$pid" ] && ! registered "$n"; then
    return 0
  fi
  if registered "$n"; then
    # `stop <pid file>` returns once the OS process has ended; without the file it would wait
    # for one forever.
    pidfile="$(node_dir "$n")/pid"
    [ -f "$pidfile" ] || pidfile=""
    if ! out=$(CTL_BOUND=$STOP_TIMEOUT ctl "$n" stop $pidfile 2>&1); then
      say "rabbitmqctl stop failed for $(node_name "$n")${pid:+ (pid $pid)}: $out"
    fi
  fi
  if [ -n "$pid" ] && alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.2; done
    if alive "$pid"; then
      say "$(node_name "$n") (pid $pid) ignored SIGTERM for 20 s: killing it"
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    fi
  fi
  # epmd drops the name when the VM's connection to it closes.
  for _ in $(seq 50); do registered "$n" || return 0; sleep 0.2; done
  die "$(node_name "$n") is still registered with epmd"
}

cmd_start() {
  local start n port out
  start=$(now)
  for n in "${NODES[@]}"; do
    if registered "$n" || node_pid "$n" >/dev/null; then
      die "$(node_name "$n") is already running: run '$0 stop' first"
    fi
  done
  for n in "${NODES[@]}"; do
    for port in "$(amqp_port "$n")" "$(dist_port "$n")"; do
      listening "$port" && die "port $port is taken (set CLUSTER_AMQP_PORT / CLUSTER_DIST_PORT)"
    done
  done
  command -v rabbitmq-server >/dev/null || [ -x "$SERVER" ] ||
    die "rabbitmq-server is not installed: apt-get install rabbitmq-server"
  rm -rf "$BASE" # nothing of ours runs, so this is a stale directory
  # From here on, a failure stops what was started.
  trap 'status=$?; if [ $status -ne 0 ]; then say "start failed: stopping the nodes"; cmd_stop; fi' EXIT
  for n in "${NODES[@]}"; do
    write_config "$n"
    launch "$n"
  done
  for n in "${NODES[@]}"; do await_boot "$n"; done
  for n in "${NODES[@]:1}"; do
    ctl "$n" stop_app >&2
    # (join_cluster prints harmless "Failed to create a tracked connection table" errors: the
    # app is stopped. Show its output only when it fails.)
    out=$(ctl "$n" join_cluster "$(node_name 1)" 2>&1) || { say "$out"; log_tail "$n"; die "$(node_name "$n") could not join $(node_name 1)"; }
    ctl "$n" start_app >&2
    ctl "$n" await_startup --timeout "$TIMEOUT" >&2
  done
  await_cluster 1
  trap - EXIT
  say "cluster of ${#NODES[@]} up in $(since "$start") s: $(node_name 1), $(node_name 2), $(node_name 3)"
  urls
}

cmd_stop_node() {
  local n=$1 start
  start=$(now)
  if ! registered "$n" && ! node_pid "$n" >/dev/null; then
    say "$(node_name "$n") is not running"
    return 0
  fi
  halt "$n"
  say "$(node_name "$n") stopped in $(since "$start") s"
}

cmd_kill_node() {
  local n=$1 pid
  pid=$(node_pid "$n") || { say "$(node_name "$n") is not running"; return 0; }
  kill -KILL "$pid"
  for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
  say "$(node_name "$n") (pid $pid) killed"
}

cmd_start_node() {
  local n=$1 start
  start=$(now)
  [ -d "$(node_dir "$n")/mnesia" ] || die "$(node_dir "$n") is missing: was the cluster started?"
  if ! registered "$n" && ! node_pid "$n" >/dev/null; then
    launch "$n"
    await_boot "$n"
  elif ! listening "$(amqp_port "$n")"; then
    # The VM runs but the app does not (stop_app by hand): start the app.
    ctl "$n" start_app >&2
    ctl "$n" await_startup --timeout "$TIMEOUT" >&2
  fi
  await_cluster "$n"
  say "$(node_name "$n") back in the cluster in $(since "$start") s"
}

cmd_status() {
  local n state any=""
  for n in "${NODES[@]}"; do
    if ! registered "$n"; then
      state=down
      node_pid "$n" >/dev/null && state=booting
    elif listening "$(amqp_port "$n")"; then
      state=running
      any=${any:-$n}
    else
      state="vm up, app not running"
    fi
    printf '%s\t%s\t%s\n' "$(node_name "$n")" "$state" "$(url "$n")"
  done
  if [ -n "$any" ]; then
    printf 'running nodes (seen by %s): ' "$(node_name "$any")"
    ctl "$any" eval 'rabbit_nodes:all_running().' | tr -d '\n '
    echo
    echo "queues (name, type, leader, online members):"
    ctl "$any" list_queues name type leader online --no-table-headers
  fi
}

cmd_leader() {
  local queue=$1 n m lines leader
  for n in "${NODES[@]}"; do
    listening "$(amqp_port "$n")" || continue
    lines=$(ctl "$n" list_queues name leader --no-table-headers 2>/dev/null) || continue
    leader=$(awk -F'\t' -v q="$queue" '$1 == q { print $2 }' <<<"$lines")
    [ -n "$leader" ] || die "no queue '$queue' with a leader (seen by $(node_name "$n"))"
    for m in "${NODES[@]}"; do
      [ "$leader" = "$(node_name "$m")" ] && { echo "$m"; return 0; }
    done
    die "queue '$queue' is led by $leader, not one of ours"
  done
  die "no running node answered"
}

cmd_stop() {
  local n pids=()
  for n in "${NODES[@]}"; do
    halt "$n" &
    pids+=($!)
  done
  local failed=0
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  [ $failed = 0 ] || die "some node did not stop; $BASE kept"
  rm -rf "$BASE"
  say "stopped; $BASE removed"
}

case "${1:-}" in
  start) cmd_start ;;
  urls) urls ;;
  url) check_n "${2:-}"; url "$2" ;;
  status) cmd_status ;;
  stop-node) check_n "${2:-}"; cmd_stop_node "$2" ;;
  kill-node) check_n "${2:-}"; cmd_kill_node "$2" ;;
  start-node) check_n "${2:-}"; cmd_start_node "$2" ;;
  leader) [ -n "${2:-}" ] || usage; cmd_leader "$2" ;;
  stop) cmd_stop ;;
  *) usage ;;
esac
