#!/usr/bin/env bash
# One command: set up, then run the daemon on an embedded default.
#   - a local inbox (./nufilt-inbox), store (./nufilt-store) and state (./nufilt-state);
#   - a local MLflow server with SQLite (./nufilt-state/mlflow), where each promoted version is
#     published to the registered model "nufilt-merged" with alias "production";
#   - without NUFILT_BASE_MODEL, a small demo base and three demo fine-tunes in ./nufilt-demo.
# Options: --no-mlflow (folder only). Ctrl-C stops the daemon and the MLflow server.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
USE_MLFLOW=1
for arg in "$@"; do
  case "$arg" in
    --no-mlflow) USE_MLFLOW=0 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done

bash scripts/setup.sh
NUFILT=$ROOT/.venv/bin/nufilt

if [ -z "${NUFILT_BASE_MODEL:-}" ]; then
  [ -d nufilt-demo/base ] || "$NUFILT" demo nufilt-demo >/dev/null
  export NUFILT_BASE_MODEL=$ROOT/nufilt-demo/base
  DEMO_HINT="  $NUFILT submit $ROOT/nufilt-demo/task-1"
else
  DEMO_HINT="  $NUFILT submit /path/to/a/fine-tuned/checkpoint"
fi
export NUFILT_WATCH_DIR=${NUFILT_WATCH_DIR:-$ROOT/nufilt-inbox}
export NUFILT_STORE_DIR=${NUFILT_STORE_DIR:-$ROOT/nufilt-store}
export NUFILT_STATE_DIR=${NUFILT_STATE_DIR:-$ROOT/nufilt-state}
export NUFILT_METRICS_PORT=${NUFILT_METRICS_PORT:-9180}
mkdir -p "$NUFILT_WATCH_DIR" "$NUFILT_STORE_DIR" "$NUFILT_STATE_DIR"

MLFLOW_PID=""
cleanup() { [ -n "$MLFLOW_PID" ] && kill "$MLFLOW_PID" 2>/dev/null || true; }
trap cleanup EXIT INT TERM
if [ "$USE_MLFLOW" = 1 ]; then
  MLFLOW_PORT=${MLFLOW_PORT:-5000}
  mkdir -p "$NUFILT_STATE_DIR/mlflow"
  "$ROOT/.venv/bin/mlflow" server --backend-store-uri "sqlite:///$NUFILT_STATE_DIR/mlflow/mlflow.db" \
    --artifacts-destination "$NUFILT_STATE_DIR/mlflow/artifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" \
    >"$NUFILT_STATE_DIR/mlflow/server.log" 2>&1 &
  MLFLOW_PID=$!
  for _ in $(seq 120); do
    curl -fsS "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null 2>&1 && break
    kill -0 "$MLFLOW_PID" 2>/dev/null || { echo "mlflow server failed: see $NUFILT_STATE_DIR/mlflow/server.log" >&2; exit 1; }
    sleep 1
  done
  export NUFILT_MLFLOW__TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
  export NUFILT_MLFLOW__TARGET_MODEL=${NUFILT_MLFLOW__TARGET_MODEL:-nufilt-merged}
  export NUFILT_MLFLOW__SOURCE_MODEL=${NUFILT_MLFLOW__SOURCE_MODEL:-nufilt-finetuned}
  echo "MLflow UI: http://127.0.0.1:$MLFLOW_PORT (registered model $NUFILT_MLFLOW__TARGET_MODEL, alias production)"
fi

cat <<EOF
nufilt daemon starting: base $NUFILT_BASE_MODEL, inbox $NUFILT_WATCH_DIR, store $NUFILT_STORE_DIR
In another shell:
$DEMO_HINT
  $NUFILT status
  curl -s http://127.0.0.1:$NUFILT_METRICS_PORT/metrics | grep ^nufilt_
EOF
"$NUFILT" daemon
