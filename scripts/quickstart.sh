#!/usr/bin/env bash
# One command: set up, then run the daemon on an embedded default.
#   - a local inbox (./nufilt-inbox), store (./nufilt-store) and state (./nufilt-state);
#   - a local MLflow server with SQLite (./nufilt-state/mlflow), where each promoted version is
#     published to the registered model "nufilt-merged" with alias "production";
#   - without NUFILT_BASE_MODEL, a small demo base and three demo fine-tunes in ./nufilt-demo.
# Options: --no-mlflow (folder only). Ctrl-C, or SIGINT/SIGTERM to this script's PID, stops the
# daemon and the MLflow server.
# Ports: MLFLOW_PORT (5000), NUFILT_METRICS_PORT (9180). The settings used are written to
# ./nufilt-state/quickstart.toml, for `nufilt` commands in another shell (NUFILT_CONFIG).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
USE_MLFLOW=1
for arg in "$@"; do
  case "$arg" in
    --no-mlflow) USE_MLFLOW=0 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
toml_str() { local s=${1//\\/\\\\}; printf '"%s"' "${s//\"/\\\"}"; }

bash scripts/setup.sh
NUFILT=$ROOT/.venv/bin/nufilt

if [ -z "${NUFILT_BASE_MODEL:-}" ]; then
  [ -d nufilt-demo/base ] || "$NUFILT" demo nufilt-demo >/dev/null
  BASE_MODEL=$ROOT/nufilt-demo/base
  DEMO_HINT="  $NUFILT submit $ROOT/nufilt-demo/task-1"
else
  BASE_MODEL=$NUFILT_BASE_MODEL
  DEMO_HINT="  $NUFILT submit /path/to/a/fine-tuned/checkpoint"
fi
WATCH_DIR=${NUFILT_WATCH_DIR:-$ROOT/nufilt-inbox}
STORE_DIR=${NUFILT_STORE_DIR:-$ROOT/nufilt-store}
STATE_DIR=${NUFILT_STATE_DIR:-$ROOT/nufilt-state}
METRICS_PORT=${NUFILT_METRICS_PORT:-9180}
mkdir -p "$WATCH_DIR" "$STORE_DIR" "$STATE_DIR"
if port_in_use "$METRICS_PORT"; then
  echo "port $METRICS_PORT is in use: set NUFILT_METRICS_PORT to a free port" >&2; exit 1
fi
CONFIG=$STATE_DIR/quickstart.toml
cat >"$CONFIG" <<EOF
# written by scripts/quickstart.sh; NUFILT_* environment variables override it
base_model = $(toml_str "$BASE_MODEL")
watch_dir = $(toml_str "$WATCH_DIR")
store_dir = $(toml_str "$STORE_DIR")
state_dir = $(toml_str "$STATE_DIR")
metrics_port = $METRICS_PORT
EOF

MLFLOW_PID=""
DAEMON_PID=""
cleanup() {
  if [ -n "$DAEMON_PID" ]; then  # the daemon first: it finishes or abandons its merge, then stops
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=""
  fi
  [ -n "$MLFLOW_PID" ] || return 0
  kill -TERM -- "-$MLFLOW_PID" 2>/dev/null || true  # its own process group: the server and its workers
  for _ in $(seq 20); do kill -0 -- "-$MLFLOW_PID" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$MLFLOW_PID" 2>/dev/null || true
  MLFLOW_PID=""
}
# SIGINT (Ctrl-C) or SIGTERM to this script's PID stops the daemon and MLflow: the daemon runs in the
# background and the script waits for it, so a signal interrupts the wait and the EXIT trap runs
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if [ "$USE_MLFLOW" = 1 ]; then
  MLFLOW_PORT=${MLFLOW_PORT:-5000}
  MLFLOW_URL=http://127.0.0.1:$MLFLOW_PORT
  if port_in_use "$MLFLOW_PORT"; then
    echo "port $MLFLOW_PORT is in use: set MLFLOW_PORT to a free port" >&2; exit 1
  fi
  mkdir -p "$STATE_DIR/mlflow"
  # no background job runner: nufilt does not need it, and it leaves extra processes behind
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$ROOT/.venv/bin/mlflow" server \
    --backend-store-uri "sqlite:///$STATE_DIR/mlflow/mlflow.db" --artifacts-destination "$STATE_DIR/mlflow/artifacts" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 >"$STATE_DIR/mlflow/server.log" 2>&1 &
  MLFLOW_PID=$!
  for i in $(seq 121); do
    kill -0 "$MLFLOW_PID" 2>/dev/null || { echo "mlflow server failed: see $STATE_DIR/mlflow/server.log" >&2; exit 1; }
    curl -fsS "$MLFLOW_URL/health" >/dev/null 2>&1 && break
    [ "$i" -lt 121 ] || { echo "mlflow server not up after 120 s: see $STATE_DIR/mlflow/server.log" >&2; exit 1; }
    sleep 1
  done
  TARGET_MODEL=${NUFILT_MLFLOW__TARGET_MODEL:-nufilt-merged}
  cat >>"$CONFIG" <<EOF
[mlflow]
tracking_uri = $(toml_str "$MLFLOW_URL")
source_model = $(toml_str "${NUFILT_MLFLOW__SOURCE_MODEL:-nufilt-finetuned}")
target_model = $(toml_str "$TARGET_MODEL")
EOF
  echo "MLflow UI: $MLFLOW_URL (registered model $TARGET_MODEL, alias production)"
fi

cat <<EOF
nufilt daemon starting: base $BASE_MODEL, inbox $WATCH_DIR, store $STORE_DIR, config $CONFIG
In another shell:
  export NUFILT_CONFIG=$CONFIG
$DEMO_HINT
  $NUFILT status
  curl -s http://127.0.0.1:$METRICS_PORT/metrics | grep ^nufilt_
EOF
if [ "$USE_MLFLOW" = 1 ]; then
  echo "  curl -s '$MLFLOW_URL/api/2.0/mlflow/registered-models/alias?name=$TARGET_MODEL&alias=production' | grep -m1 '\"version\"'"
fi
"$NUFILT" daemon --config "$CONFIG" &
DAEMON_PID=$!
rc=0
wait "$DAEMON_PID" || rc=$?
DAEMON_PID=""
exit "$rc"
