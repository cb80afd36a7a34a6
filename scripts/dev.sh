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
echo "starting the local AWS emulator and the control plane:"
MOTO_PORT=${MOTO_PORT:-5055}
# Managed policies (ReadOnlyAccess) exist in the emulator only with this: debug access needs it.
MOTO_IAM_LOAD_MANAGED_POLICIES=true "$BIN/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" \
  >.dev/moto.log 2>&1 &
pids+=($!)
echo "  moto (pid $!): AWS API on http://127.0.0.1:$MOTO_PORT, log .dev/moto.log"
start registry 9101 "$BIN/substrate-registry"
start rollout 9102 "$BIN/substrate-rollout"
start flags 9103 "$BIN/substrate-flags"
AWS_ENDPOINT_URL=http://127.0.0.1:$MOTO_PORT AWS_ACCESS_KEY_ID=testing \
  AWS_SECRET_ACCESS_KEY=testing AWS_REGION=eu-west-1 \
  start infra_compliance 9104 "$BIN/substrate-infra-compliance"

for _ in $(seq 1 40); do
  "$BIN/substratectl" status >/dev/null 2>&1 && break
  sleep 0.5
done
"$BIN/substratectl" status || echo "(some services are not up yet; see .dev/*.log)"

# A demo cell with its agent, as a customer would run it. The agent URL is shown only once at
# creation, so it is kept in .dev/ for the next `make dev`.
if [ ! -s .dev/demo-cell.url ]; then
  if "$BIN/substratectl" --json cells create demo-cell --stage staging --region eu-west-1 \
      --org demo >.dev/demo-cell.json 2>.dev/demo-cell.err; then
    "$BIN/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["amqp_url"])' \
      .dev/demo-cell.json >.dev/demo-cell.url
  else
    echo "(demo-cell exists but its URL is gone: rotate-credentials it and put the new URL in .dev/demo-cell.url)"
  fi
fi
if [ -s .dev/demo-cell.url ]; then
  # Its bootstrap stack, from the template's first version (the emulator starts empty).
  AWS_ENDPOINT_URL=http://127.0.0.1:$MOTO_PORT AWS_ACCESS_KEY_ID=testing \
    AWS_SECRET_ACCESS_KEY=testing AWS_REGION=eu-west-1 \
    "$BIN/python" scripts/dev_infra.py "http://127.0.0.1:$MOTO_PORT" .dev >/dev/null \
    2>.dev/demo-stack.err || echo "(the demo cell's stack was not created; see .dev/demo-stack.err)"
  CELL_ID=demo-cell CELL_AMQP_URL=$(cat .dev/demo-cell.url) CELL_STATE_DIR=.dev/demo-cell-state \
    CELL_HEARTBEAT_SECONDS=5 CELL_SYNC_SECONDS=10 CELL_METRICS_PORT=9180 \
    CELL_STACK_NAME=substrate-demo-cell \
    AWS_ENDPOINT_URL=http://127.0.0.1:$MOTO_PORT AWS_ACCESS_KEY_ID=testing \
    AWS_SECRET_ACCESS_KEY=testing AWS_REGION=eu-west-1 \
    "$BIN/cell-agent" run >.dev/cell-agent.log 2>&1 &
  pids+=($!)
  echo "  cell-agent demo-cell (pid $!): health http://127.0.0.1:9180/healthz, log .dev/cell-agent.log"
fi
# A demo release (its image pushed to the emulator's ECR) and short soaks for trying rollouts.
if "$BIN/python" scripts/dev_release.py "http://127.0.0.1:$MOTO_PORT" .dev >/dev/null 2>.dev/demo-release.err \
    && "$BIN/substratectl" rollout policy set .dev/dev-policy.yaml >/dev/null; then
  echo "  demo release file .dev/demo-release.yaml; rollout policy: 5 s soaks"
fi
# A demo infrastructure template: the current one, which the demo cell (on version 1) must
# apply within an hour. Published once: a later `make dev` finds it published.
if "$BIN/substratectl" infra publish 2 --template cell_agent/bootstrap/cell.yaml --grace 1h \
    >/dev/null 2>.dev/demo-template.err; then
  echo "  demo infrastructure template 2 published: the demo cell has an hour to apply it"
fi
echo
echo "Try: $BIN/substratectl cells list, $BIN/substratectl cells show demo-cell,"
echo "     $BIN/substratectl infra status; (as the customer) CELL_ID=demo-cell ... $BIN/cell-agent infra status,"
echo "     $BIN/substratectl release publish .dev/demo-release.yaml; $BIN/substratectl rollout watch,"
echo "     $BIN/substratectl flags set .dev/demo-flag.yaml; curl -s 127.0.0.1:9180/flags/new-editor"
echo "RabbitMQ console: http://127.0.0.1:15672 (guest/guest). Ctrl-C stops everything."
wait -n "${pids[@]}" || true
echo "a process exited; see .dev/*.log"
