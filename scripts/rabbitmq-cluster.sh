#!/usr/bin/env bash
# A RabbitMQ cluster of three nodes on this machine, for trying Substrate on a cluster and for
# the benchmarks: each node has its own name, ports and data directory; they share a cookie.
#
#   scripts/rabbitmq-cluster.sh start     start and join the nodes; prints SUBSTRATE_AMQP_URL
#   scripts/rabbitmq-cluster.sh status    the cluster's running nodes
#   scripts/rabbitmq-cluster.sh stop      stop every node (gracefully), data kept
#   scripts/rabbitmq-cluster.sh url       print SUBSTRATE_AMQP_URL for the cluster
#
# Settings: SUBSTRATE_CLUSTER_DIR (.dev/cluster), SUBSTRATE_CLUSTER_NODES (3),
# SUBSTRATE_CLUSTER_PORT (5681: node i listens for AMQP on PORT+i, management on 10000 more,
# distribution on 20000 more), SUBSTRATE_BROKER_NOFILE (20000 or the hard limit if lower: a
# socket per cell; RabbitMQ's default of 1,024 holds about 830 connections).
set -euo pipefail

DIR=$(realpath -m "${SUBSTRATE_CLUSTER_DIR:-.dev/cluster}")
NODES=${SUBSTRATE_CLUSTER_NODES:-3}
PORT=${SUBSTRATE_CLUSTER_PORT:-5681}
NOFILE=${SUBSTRATE_BROKER_NOFILE:-20000}
BIN=/usr/lib/rabbitmq/bin

die() { echo "error: $*" >&2; exit 1; }
[[ $NODES =~ ^[1-9]$ ]] || die "SUBSTRATE_CLUSTER_NODES must be 1 to 9, not '$NODES'"
[[ $PORT =~ ^[0-9]+$ ]] && ((PORT > 1024 && PORT + NODES + 20000 < 65536)) \
  || die "SUBSTRATE_CLUSTER_PORT must leave room for PORT+20000+nodes below 65536, not '$PORT'"
[[ -x $BIN/rabbitmq-server ]] || die "rabbitmq-server is missing (make services installs it)"

name() { echo "substrate-$1@localhost"; }
amqp_port() { echo $((PORT + $1)); }

node_env() {
  local i=$1 root="$DIR/node$1"
  export HOME="$DIR" RABBITMQ_NODENAME="$(name "$i")" RABBITMQ_DIST_PORT=$((PORT + 20000 + i))
  export RABBITMQ_MNESIA_BASE="$root/mnesia" RABBITMQ_LOG_BASE="$root/log"
  export RABBITMQ_CONFIG_FILE="$root/rabbitmq.conf" RABBITMQ_PID_FILE="$root/beam.pid"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$root/enabled_plugins"
}

ctl() { (node_env "$1"; "$BIN/rabbitmqctl" -q -n "$(name "$1")" "${@:2}"); }

url() {
  local urls=() i
  for ((i = 1; i <= NODES; i++)); do urls+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$i")/"); done
  (IFS=,; echo "${urls[*]}")
}

start_node() {
  local i=$1 root="$DIR/node$1"
  mkdir -p "$root/mnesia" "$root/log"
  cat >"$root/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$(amqp_port "$i")
management.tcp.ip = 127.0.0.1
management.tcp.port = $((PORT + 10000 + i))
prometheus.tcp.ip = 127.0.0.1
prometheus.tcp.port = $((PORT + 11000 + i))
loopback_users = none
EOF
  echo "[rabbitmq_management,rabbitmq_prometheus]." >"$root/enabled_plugins"
  if ctl "$i" status >/dev/null 2>&1; then
    echo "node $(name "$i") already running"
    return
  fi
  local hard limit
  hard=$(ulimit -Hn)
  limit=$NOFILE
  [[ $hard != unlimited ]] && ((hard < limit)) && limit=$hard
  echo "starting $(name "$i") (AMQP $(amqp_port "$i"), management $((PORT + 10000 + i)), open files $limit)"
  (node_env "$i"; ulimit -n "$limit"; "$BIN/rabbitmq-server" -detached)
}

start() {
  mkdir -p "$DIR"
  local i
  for ((i = 1; i <= NODES; i++)); do start_node "$i"; done
  for ((i = 1; i <= NODES; i++)); do
    ctl "$i" wait --timeout 180 "$DIR/node$i/beam.pid" || die "node $(name "$i") did not start (see $DIR/node$i/log)"
  done
  for ((i = 2; i <= NODES; i++)); do
    if ctl 1 eval "lists:member('$(name "$i")', rabbit_mnesia:cluster_nodes(all))." | grep -q true; then
      continue
    fi
    echo "joining $(name "$i") to $(name 1)"
    ctl "$i" stop_app
    ctl "$i" join_cluster "$(name 1)"
    ctl "$i" start_app
  done
  local running
  running=$(ctl 1 eval "length(rabbit_mnesia:cluster_nodes(running)).")
  [[ $running == "$NODES" ]] || die "the cluster has $running of $NODES nodes running"
  echo "cluster of $NODES nodes up; use:"
  echo "  export SUBSTRATE_AMQP_URL=$(url)"
  echo "  export SUBSTRATE_RABBITMQ_API_URL=http://guest:guest@127.0.0.1:$((PORT + 10001))"
}

stop() {
  local i
  for ((i = NODES; i >= 1; i--)); do
    if ctl "$i" status >/dev/null 2>&1; then
      echo "stopping $(name "$i")"
      ctl "$i" stop "$DIR/node$i/beam.pid"
    fi
  done
}

status() {
  ctl 1 eval "rabbit_mnesia:cluster_nodes(running)." || die "node $(name 1) is not running"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  url) url ;;
  *) die "usage: $0 start|stop|status|url" ;;
esac
