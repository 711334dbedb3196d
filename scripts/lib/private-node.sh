# A private RabbitMQ node on free ports, for one run of the test suite: its own node name, data
# directory and listeners, so that nothing the tests do (declare, delete, stop, alarm) reaches
# the machine's broker. Source it, then `private_node_start NAME DIR` exports AMQP_URL and
# DESKBRIDGE_TEST_NODE; `private_node_stop` stops the node and deletes its directory.

# A TCP port nothing listens on, from a range the machine's services and ephemeral ports avoid.
free_port() {
  local port
  for _ in $(seq 200); do
    port=$((20000 + RANDOM % 10000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  echo "no free port found in 20000-29999" >&2
  return 1
}

private_node_start() {
  PRIVATE_NODE=$1
  PRIVATE_NODE_DIR=$2
  local amqp_port dist_port
  amqp_port=$(free_port)
  dist_port=$(free_port)
  while [ "$dist_port" = "$amqp_port" ]; do dist_port=$(free_port); done
  mkdir -p "$PRIVATE_NODE_DIR/mnesia" "$PRIVATE_NODE_DIR/log"
  echo '[].' > "$PRIVATE_NODE_DIR/enabled_plugins"
  cat > "$PRIVATE_NODE_DIR/rabbitmq.conf" <<CONF
listeners.tcp.1 = 127.0.0.1:$amqp_port
loopback_users = none
log.console = false
CONF
  (
    export RABBITMQ_NODENAME=$PRIVATE_NODE RABBITMQ_NODE_PORT=$amqp_port RABBITMQ_DIST_PORT=$dist_port
    export RABBITMQ_MNESIA_BASE=$PRIVATE_NODE_DIR/mnesia RABBITMQ_LOG_BASE=$PRIVATE_NODE_DIR/log
    export RABBITMQ_PID_FILE=$PRIVATE_NODE_DIR/pid
    export RABBITMQ_ENABLED_PLUGINS_FILE=$PRIVATE_NODE_DIR/enabled_plugins
    export RABBITMQ_CONFIG_FILE=$PRIVATE_NODE_DIR/rabbitmq
    # Debian's wrapper switches to the rabbitmq user with su, whose PAM session resets ulimits:
    # switch ourselves and raise the descriptor limit to its maximum after it (hundreds of
    # test connections).
    local server=/usr/lib/rabbitmq/bin/rabbitmq-server
    if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1 && [ -x "$server" ]; then
      chown -R rabbitmq:rabbitmq "$PRIVATE_NODE_DIR"
      su rabbitmq -s /bin/sh -c "cd /var/lib/rabbitmq && ulimit -n \$(ulimit -Hn) && $server -detached" >/dev/null
    else
      ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
      rabbitmq-server -detached >/dev/null
    fi
  )
  # -detached returns before the node listens: wait for the listener, then for the boot.
  for _ in $(seq 120); do
    (exec 3<>"/dev/tcp/127.0.0.1/$amqp_port") 2>/dev/null && break
    sleep 0.5
  done
  if ! rabbitmqctl -n "$PRIVATE_NODE" -q await_startup --timeout 120; then
    echo "the private RabbitMQ node $PRIVATE_NODE did not boot; its log:" >&2
    tail -n 40 "$PRIVATE_NODE_DIR"/log/*.log >&2 || true
    return 1
  fi
  export AMQP_URL="amqp://guest:guest@127.0.0.1:$amqp_port/%2f"
  export DESKBRIDGE_TEST_NODE=$PRIVATE_NODE
}

private_node_stop() {
  if [ -n "${PRIVATE_NODE:-}" ]; then
    rabbitmqctl -n "$PRIVATE_NODE" -q stop >/dev/null 2>&1 || true
    rm -rf "$PRIVATE_NODE_DIR"
  fi
}
