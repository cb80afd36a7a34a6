#!/usr/bin/env bash
# make dev: every part that exists so far, as local processes against the local broker and
# Redis. Logs go to .dev/<part>.log; Ctrl-C (or SIGTERM) stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
mkdir -p .dev
pids=()

stop_all() {
  trap - INT TERM EXIT
  echo "stopping ${#pids[@]} processes"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait || true
}
trap "stop_all; exit 0" INT TERM
trap stop_all EXIT

start() {
  local name=$1 port=$2
  shift 2
  SUBSTRATE_METRICS_PORT=$port "$@" >".dev/$name.log" 2>&1 &
  pids+=($!)
  echo "  $name (pid $!): metrics http://127.0.0.1:$port/metrics, log .dev/$name.log"
}

"$BIN/substratectl" topology apply
echo "starting the control plane:"
start registry 9101 "$BIN/substrate-registry"
start rollout 9102 "$BIN/substrate-rollout"
start flags 9103 "$BIN/substrate-flags"
start infra_compliance 9104 "$BIN/substrate-infra-compliance"

for _ in $(seq 1 40); do
  "$BIN/substratectl" status >/dev/null 2>&1 && break
  sleep 0.5
done
"$BIN/substratectl" status || echo "(some services are not up yet; see .dev/*.log)"
echo
echo "Try: $BIN/substratectl status, $BIN/substratectl schema."
echo "RabbitMQ console: http://127.0.0.1:15672 (guest/guest). Ctrl-C stops everything."
wait -n "${pids[@]}" || true
echo "a process exited; see .dev/*.log"
