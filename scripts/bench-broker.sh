#!/usr/bin/env bash
# A private RabbitMQ node for benchmarks: its own name, ports and data dir, Web-STOMP enabled,
# and a raised file-descriptor limit so thousands of connections fit. The shared broker on
# 5672 is not touched.
#   scripts/bench-broker.sh start   # AMQP on 5673, Web-STOMP on ws://127.0.0.1:15684/ws
#   scripts/bench-broker.sh pid     # OS pid of the node (for CPU and RSS accounting)
#   scripts/bench-broker.sh stop
set -euo pipefail
NODE=${BENCH_NODE:-deskbridge-bench@localhost}
BASE=${BENCH_BROKER_DIR:-/tmp/deskbridge-bench-broker}
export RABBITMQ_NODENAME=$NODE
export RABBITMQ_NODE_PORT=${BENCH_AMQP_PORT:-5673}
export RABBITMQ_DIST_PORT=${BENCH_DIST_PORT:-25673}
export RABBITMQ_MNESIA_BASE=$BASE/mnesia
export RABBITMQ_LOG_BASE=$BASE/log
export RABBITMQ_PID_FILE=$BASE/pid
export RABBITMQ_ENABLED_PLUGINS_FILE=$BASE/enabled_plugins
export RABBITMQ_CONFIG_FILE=$BASE/rabbitmq
NOFILE=${BENCH_BROKER_NOFILE:-20000}

case "${1:-}" in
  start)
    mkdir -p "$BASE/mnesia" "$BASE/log"
    echo '[rabbitmq_web_stomp].' > "$BASE/enabled_plugins"
    cat > "$BASE/rabbitmq.conf" <<CONF
listeners.tcp.1 = 127.0.0.1:$RABBITMQ_NODE_PORT
web_stomp.tcp.ip = 127.0.0.1
web_stomp.tcp.port = ${BENCH_WEB_STOMP_PORT:-15684}
stomp.listeners.tcp.1 = 127.0.0.1:${BENCH_STOMP_PORT:-61614}
loopback_users = none
CONF
    # Debian's wrapper would `su` to the rabbitmq user, and su's PAM session resets ulimits;
    # so switch user ourselves and raise the fd limit after the switch.
    SERVER=/usr/lib/rabbitmq/bin/rabbitmq-server
    if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1 && [ -x "$SERVER" ]; then
      chown -R rabbitmq:rabbitmq "$BASE"
      su rabbitmq -s /bin/sh -c "cd /var/lib/rabbitmq && ulimit -n $NOFILE && $SERVER -detached"
    else
      ulimit -n "$NOFILE"
      rabbitmq-server -detached
    fi
    # -detached returns before the node registers; wait for it (bounded), then for the boot.
    for _ in $(seq 60); do rabbitmqctl -n "$NODE" -q ping >/dev/null 2>&1 && break; sleep 1; done
    rabbitmqctl -n "$NODE" -q await_startup --timeout 120
    echo "bench broker $NODE up: amqp 127.0.0.1:$RABBITMQ_NODE_PORT, web-stomp ws://127.0.0.1:${BENCH_WEB_STOMP_PORT:-15684}/ws, fd limit $(grep 'open files' /proc/"$("$0" pid)"/limits | awk '{print $4}')"
    ;;
  pid)
    rabbitmqctl -n "$NODE" -q eval 'io:format("~s", [os:getpid()]).' | head -c 16 | tr -dc 0-9; echo
    ;;
  stop)
    rabbitmqctl -n "$NODE" -q stop || true
    rm -rf "$BASE"
    ;;
  *)
    echo "usage: $0 start|pid|stop" >&2
    exit 2
    ;;
esac
