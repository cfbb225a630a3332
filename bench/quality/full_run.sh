#!/usr/bin/env bash
# The full run of one preset (all 8 tasks, issue 9), in priority order, so that a run stopped early
# still covers what matters most on every order it reached:
#   1. the methods and the shipped NUFILT profiles, 10 orders;
#   2. DOP (≈ 2 min per step on one core) and NUFILT's ablation, orders 0-2;
#   3. the levers the dev study compared and the settings study, orders 0-2;
#   4. the report of everything finished.
# Settings are never chosen here (that is dev_study.sh); this only measures. Run it twice side by
# side on 2 cores: the two processes share the jobs (each claims one with an flock).
#   bash bench/quality/full_run.sh [preset]    (default paper-protocol)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
P=${1:-paper-protocol}
MAIN=nufilt,nufilt_plus_rp32,opcm,magmax,weight_average,task_arithmetic,ties,wudi
EXTRA=dop,naive,nufilt_null_only,nufilt_adapter_only
LEVERS=nufilt_rp32,nufilt_rescale_model,nufilt_all_linear_avg,nufilt_all_linear_avg_rp32,nufilt_radius03
SETTINGS=nufilt_first_published,nufilt_all_linear,nufilt_keep_previous,nufilt_average
run() { .venv/bin/python -m bench.quality --preset "$P" "$@"; }
run --stage merge --only $MAIN
run --stage merge --only $EXTRA --orders 3
run --stage merge --only $LEVERS,$SETTINGS --orders 3
run --report-only --only $MAIN,$EXTRA,$LEVERS,$SETTINGS
