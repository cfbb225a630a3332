#!/usr/bin/env bash
# The dev study: settings are chosen here only (4 dev tasks, orders 0-2), never on the
# full runs. Writes bench/results/dev-<preset>.{json,md,png}. Two runs side by side share the jobs.
#   bash bench/quality/dev_study.sh [preset ...]      (default: both paper presets; hours on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
TASKS=rotten,debates,fortunes_b,wn_verb  # config.DEV_TASKS
# on all 3 dev orders: the methods, the chosen combination and its nearest alternatives
MAIN=nufilt,opcm,magmax,weight_average,task_arithmetic,dop,nufilt_rp32,nufilt_all_linear_avg
MAIN=$MAIN,nufilt_plus,nufilt_all_linear_avg_rp32
# screened on order 0 only (the levers that lost there were removed: bench/quality/README.md)
GRID=nufilt_radius03,nufilt_radius05,nufilt_plus_r01,nufilt_plus_r02
presets=("$@")
[ ${#presets[@]} -gt 0 ] || presets=(paper-protocol paper-protocol-gentle)
for p in "${presets[@]}"; do
  .venv/bin/python -m bench.quality --preset "$p" --tasks $TASKS --orders 3 --name "dev-$p" --only $MAIN
  .venv/bin/python -m bench.quality --preset "$p" --tasks $TASKS --orders 1 --name "dev-$p" --only $GRID --stage merge
  .venv/bin/python -m bench.quality --preset "$p" --tasks $TASKS --orders 3 --name "dev-$p" --only $MAIN,$GRID \
    --report-only
done
