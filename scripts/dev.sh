#!/usr/bin/env bash
# make dev: the whole system as local processes against the local broker and Redis: the AWS
# emulator, the four services, a demo fleet of five cells with their agents (one staging, one
# saas, three dedicated, so a rollout shows every stage, the canary and the waves), and
# Prometheus (Debian's package) scraping it all with the alert rules. Logs go to $DEV_DIR;
# Ctrl-C (or SIGTERM) stops everything this script started.
#
# Ports and names can be moved (the tests do): DEV_DIR (.dev), DEV_METRICS_BASE (9100: the
# services on +1..+4, a second replica on +11..+14), DEV_AGENT_BASE (9180: the agents on
# +0..+4), MOTO_PORT (5055), PROMETHEUS_PORT (9090), DEV_CELL_PREFIX (demo). SUBSTRATE_REPLICAS
# (1) runs that many replicas of every service (at most 9).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DEV_DIR=${DEV_DIR:-.dev}
METRICS_BASE=${DEV_METRICS_BASE:-9100}
AGENT_BASE=${DEV_AGENT_BASE:-9180}
MOTO_PORT=${MOTO_PORT:-5055}
PROMETHEUS_PORT=${PROMETHEUS_PORT:-9090}
PREFIX=${DEV_CELL_PREFIX:-demo}
REPLICAS=${SUBSTRATE_REPLICAS:-1}
[[ $REPLICAS =~ ^[1-9]$ ]] || { echo "error: SUBSTRATE_REPLICAS must be 1 to 9, not '$REPLICAS'" >&2; exit 2; }

# Every port this script would listen on, checked before anything starts: a busy one is named
# (with the variable that moves it) and nothing is left half-started.
ports=("MOTO_PORT=$MOTO_PORT" "PROMETHEUS_PORT=$PROMETHEUS_PORT")
for ((r = 0; r < REPLICAS; r++)); do
  for i in 1 2 3 4; do ports+=("DEV_METRICS_BASE+$((10 * r + i))=$((METRICS_BASE + 10 * r + i))"); done
done
for i in 0 1 2 3 4; do ports+=("DEV_AGENT_BASE+$i=$((AGENT_BASE + i))"); done
busy=$("$BIN/python" scripts/dev_ports.py "${ports[@]}")
if [ -n "$busy" ]; then
  while read -r line; do echo "error: $line is in use" >&2; done <<<"$busy"
  echo "(ss -ltnp shows by whom; stop it, or move the port with the variable named)" >&2
  exit 1
fi

mkdir -p "$DEV_DIR"
pids=()
names=()
logs=()

stop_all() {
  trap - INT TERM EXIT
  echo "stopping ${#pids[@]} processes"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait || true
}
trap "stop_all; exit 0" INT TERM
trap stop_all EXIT

remember() {  # PID NAME LOG WHAT
  pids+=("$1")
  names+=("$2")
  logs+=("$3")
  echo "  $2 (pid $1): $4"
}

start() {
  local name=$1 port=$2
  shift 2
  SUBSTRATE_METRICS_PORT=$port "$@" >"$DEV_DIR/$name.log" 2>&1 &
  remember $! "$name" "$DEV_DIR/$name.log" "metrics http://127.0.0.1:$port/metrics, log $DEV_DIR/$name.log"
}

export AWS_ENDPOINT_URL=http://127.0.0.1:$MOTO_PORT AWS_ACCESS_KEY_ID=testing \
  AWS_SECRET_ACCESS_KEY=testing AWS_REGION=eu-west-1

# The setup's own requests wait longer than an operator's (5 s): on a loaded machine the
# services just started may take that long to answer, and a cell created but not recorded
# here would need its credentials rotated. compose's demo waits as long.
setup_ctl() { SUBSTRATE_RPC_TIMEOUT_SECONDS=${SUBSTRATE_RPC_TIMEOUT_SECONDS:-20} "$BIN/substratectl" "$@"; }

"$BIN/substratectl" topology apply
echo "starting the local AWS emulator, the control plane and Prometheus:"
# Managed policies (ReadOnlyAccess) exist in the emulator only with this: debug access needs it.
MOTO_IAM_LOAD_MANAGED_POLICIES=true "$BIN/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" \
  >"$DEV_DIR/moto.log" 2>&1 &
remember $! moto "$DEV_DIR/moto.log" "AWS API on http://127.0.0.1:$MOTO_PORT, log $DEV_DIR/moto.log"
# Replica r of service i serves its metrics on METRICS_BASE + 10 * (r - 1) + i; the replicas
# share the service's queues (competing consumers) and its leases.
for ((r = 1; r <= REPLICAS; r++)); do
  suffix=$([ "$r" -gt 1 ] && echo "-$r" || true)
  offset=$((10 * (r - 1)))
  start "registry$suffix" $((METRICS_BASE + offset + 1)) "$BIN/substrate-registry"
  start "rollout$suffix" $((METRICS_BASE + offset + 2)) "$BIN/substrate-rollout"
  start "flags$suffix" $((METRICS_BASE + offset + 3)) "$BIN/substrate-flags"
  start "infra_compliance$suffix" $((METRICS_BASE + offset + 4)) "$BIN/substrate-infra-compliance"
done

"$BIN/python" - "$DEV_DIR/prometheus.yml" "$METRICS_BASE" "$AGENT_BASE" "$REPLICAS" "$(
  "$BIN/python" -c 'import os; from common import broker_urls; print(broker_urls.vhost(os.environ["SUBSTRATE_AMQP_URL"]))'
)" <<'EOF'
import sys
from pathlib import Path
from observability.prometheus import config
path, base, agents, replicas, vhost = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
jobs = {f"substrate-{name}": [f"127.0.0.1:{base + 10 * r + i}" for r in range(replicas)]
        for i, name in enumerate(("registry", "rollout", "flags", "infra-compliance"), 1)}
jobs["cell-agent"] = [f"127.0.0.1:{agents + i}" for i in range(5)]
Path(path).write_text(config(jobs, rabbitmq="127.0.0.1:15692", vhost=vhost, interval="5s"))
EOF
prometheus --config.file="$DEV_DIR/prometheus.yml" --storage.tsdb.path="$DEV_DIR/prometheus" \
  --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" >"$DEV_DIR/prometheus.log" 2>&1 &
remember $! prometheus "$DEV_DIR/prometheus.log" \
  "http://127.0.0.1:$PROMETHEUS_PORT (alerts: /classic/alerts), log $DEV_DIR/prometheus.log"

for _ in $(seq 1 60); do
  "$BIN/substratectl" status >/dev/null 2>&1 && break
  sleep 0.5
done
"$BIN/substratectl" status || echo "(some services are not up yet; see $DEV_DIR/*.log)"

# A demo operator with the admin role, a broker user of its own (its password is shown once, so
# its URL is kept in $DEV_DIR; one whose URL was lost is made again); the local broker's guest
# stays an admin too (SUBSTRATE_ADMINS).
if [ ! -s "$DEV_DIR/op-demo.url" ]; then
  setup_ctl operators remove demo >/dev/null 2>&1 || true
  if setup_ctl --json operators add demo --role admin >"$DEV_DIR/op-demo.json" 2>"$DEV_DIR/op-demo.err"; then
    "$BIN/python" -c 'import json, os, sys; from common import broker_urls; a = json.load(open(sys.argv[1]))
print(broker_urls.with_credentials(os.environ["SUBSTRATE_AMQP_URL"], a["name"], a["password"]))' \
      "$DEV_DIR/op-demo.json" >"$DEV_DIR/op-demo.url"
  else
    echo "(the demo operator was not added; see $DEV_DIR/op-demo.err)"
  fi
fi
[ -s "$DEV_DIR/op-demo.url" ] && echo "demo admin op-demo: SUBSTRATE_AMQP_URL=\$(cat $DEV_DIR/op-demo.url)"

# The demo fleet, as customers would run it: each cell created (its agent URL is shown only
# once, so it is kept in $DEV_DIR for the next make dev), its bootstrap stack from the
# template's first version (the emulator starts empty), and its agent.
echo "the demo fleet:"
n=0
for spec in staging saas dedicated-1 dedicated-2 dedicated-3; do
  cell="$PREFIX-$spec"
  stage=${spec%%-*}
  if [ ! -s "$DEV_DIR/$cell.url" ]; then
    # A cell made by an earlier make dev whose $DEV_DIR is gone (make clean) gets new
    # credentials: its URL was shown once and lost with the directory.
    if ! setup_ctl --json cells create "$cell" --stage "$stage" --region eu-west-1 \
        --org "$PREFIX-org" >"$DEV_DIR/$cell.json" 2>"$DEV_DIR/$cell.err" \
      && ! { grep -q "already exists" "$DEV_DIR/$cell.err" \
        && setup_ctl --json cells rotate-credentials "$cell" --rebind >"$DEV_DIR/$cell.json" \
          2>"$DEV_DIR/$cell.err"; }; then
      echo "error: cannot create $cell: $(cat "$DEV_DIR/$cell.err")" >&2
      exit 1
    fi
    "$BIN/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["amqp_url"])' \
      "$DEV_DIR/$cell.json" >"$DEV_DIR/$cell.url"
  fi
  "$BIN/python" scripts/dev_infra.py "$AWS_ENDPOINT_URL" "$DEV_DIR" "$cell" >/dev/null \
    2>"$DEV_DIR/$cell-stack.err" || echo "  ($cell's stack was not created; see $DEV_DIR/$cell-stack.err)"
  port=$((AGENT_BASE + n))
  CELL_ID=$cell CELL_AMQP_URL=$(cat "$DEV_DIR/$cell.url") CELL_STATE_DIR="$DEV_DIR/$cell-state" \
    CELL_HEARTBEAT_SECONDS=5 CELL_SYNC_SECONDS=10 CELL_METRICS_PORT=$port \
    CELL_STACK_NAME="substrate-$cell" \
    "$BIN/cell-agent" run >"$DEV_DIR/$cell.log" 2>&1 &
  remember $! "cell-agent $cell ($stage)" "$DEV_DIR/$cell.log" \
    "health http://127.0.0.1:$port/healthz, log $DEV_DIR/$cell.log"
  n=$((n + 1))
done

# A demo release (its image pushed to the emulator's ECR), short soaks, a demo flag file, and a
# demo infrastructure template the cells (on version 1) must apply within the hour.
if "$BIN/python" scripts/dev_release.py "$AWS_ENDPOINT_URL" "$DEV_DIR" >/dev/null 2>"$DEV_DIR/demo-release.err" \
    && setup_ctl rollout policy set "$DEV_DIR/dev-policy.yaml" >/dev/null; then
  echo "  demo release file $DEV_DIR/demo-release.yaml; rollout policy: 5 s soaks"
fi
if setup_ctl infra publish 3 --template cell_agent/bootstrap/cell.yaml --grace 1h \
    >/dev/null 2>"$DEV_DIR/demo-template.err"; then
  echo "  demo infrastructure template 3 published: the cells have an hour to apply it"
fi
echo
echo "Try: $BIN/substratectl cells list; $BIN/substratectl release publish $DEV_DIR/demo-release.yaml"
echo "     $BIN/substratectl rollout watch   (staging, saas, then dedicated: canary and two waves)"
echo "     $BIN/substratectl flags set $DEV_DIR/demo-flag.yaml; curl -s 127.0.0.1:$AGENT_BASE/flags/new-editor"
echo "     curl -s -X POST 127.0.0.1:$AGENT_BASE/ofrep/v1/evaluate/flags/new-editor   (OpenFeature's OFREP)"
echo "     $BIN/substratectl infra status; $BIN/substratectl audit --since 1h"
echo "RabbitMQ console: http://127.0.0.1:15672 (guest/guest); Prometheus: http://127.0.0.1:$PROMETHEUS_PORT/classic/alerts"
echo "Ctrl-C stops everything."
# Until Ctrl-C, or until one of them exits: then that one is named with the end of its log,
# the rest are stopped, and make dev fails.
code=0
wait -n "${pids[@]}" || code=$?
for i in "${!pids[@]}"; do
  if ! kill -0 "${pids[$i]}" 2>/dev/null; then
    echo "error: ${names[$i]} (pid ${pids[$i]}) exited with code $code; the end of ${logs[$i]}:" >&2
    tail -n 15 "${logs[$i]}" | sed 's/^/  /' >&2
    break
  fi
done
exit 1
