#!/usr/bin/env bash
# Makes sure RabbitMQ (with the management and Prometheus plugins) and Redis answer on
# localhost. Starts them if they are installed but down; installs them from Debian's packages
# where they are missing. Fails loudly if either is still not up.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 what=$2 tries=${3:-120}
  for ((i = 0; i < tries; i++)); do
    port_open "$port" && return 0
    sleep 0.5
  done
  echo "error: $what is not answering on 127.0.0.1:$port" >&2
  return 1
}

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- Redis -----------------------------------------------------------------------------------
if ! port_open 6379; then
  command -v redis-server >/dev/null || { echo "installing redis-server"; apt_install redis-server; }
  echo "starting redis-server"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi
wait_port 6379 "Redis"

# --- RabbitMQ --------------------------------------------------------------------------------
if ! port_open 5672; then
  command -v rabbitmq-server >/dev/null || { echo "installing rabbitmq-server"; apt_install rabbitmq-server; }
  # A socket per cell: Debian's wrapper would start the broker with 1,024 open files (about 830
  # connections); started as its user directly, it gets SUBSTRATE_BROKER_NOFILE (20,000, or the
  # hard limit where that is lower).
  nofile=${SUBSTRATE_BROKER_NOFILE:-20000}
  hard=$(ulimit -Hn)
  [ "$hard" != unlimited ] && [ "$hard" -lt "$nofile" ] && nofile=$hard
  if id rabbitmq >/dev/null 2>&1 && [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    echo "starting rabbitmq-server (open files $nofile)"
    su rabbitmq -s /bin/sh -c "ulimit -n $nofile; exec /usr/lib/rabbitmq/bin/rabbitmq-server -detached"
  else
    echo "starting rabbitmq-server"
    rabbitmq-server -detached
  fi
  wait_port 5672 "RabbitMQ" 240
  rabbitmqctl -q await_startup
fi
if ! port_open 15672; then
  echo "enabling the RabbitMQ management and Prometheus plugins"
  rabbitmq-plugins -q enable rabbitmq_management rabbitmq_prometheus >/dev/null
fi
wait_port 15672 "RabbitMQ management API" 120
# The largest body the broker takes (common/topology.py BROKER_MAX_MESSAGE_BYTES; its default,
# 128 MiB, let one cell put that much into a queue per publish). Set on the running broker,
# for channels opened from now on, every time: a broker restarted by hand gets it back here.
rabbitmqctl -q eval 'application:set_env(rabbit, max_message_size, 16777216).' >/dev/null
# Prometheus's promtool checks the alert rules; the observability tests run a real Prometheus.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "installing prometheus (for promtool and the dashboards' tests)"
  apt_install --no-install-recommends prometheus
fi
echo "RabbitMQ (5672, management 15672) and Redis (6379) are up; prometheus is installed"
