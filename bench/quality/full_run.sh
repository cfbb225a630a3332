#!/usr/bin/env bash
# The full run of one preset (all 8 tasks), in priority order, so that a run stopped early
# still covers what matters most:
#   1. NUFILT (paper, plus and plus-iso profiles) and the baselines that cost seconds a step, 10 orders;
#   2. DOP (≈ 2 min a step on one core), TIES and WUDI, orders 0-2;
#   3. NUFILT's ablation (the paper's Table 4), orders 0-2;
#   4. the levers the dev study compared and the settings study, orders 0-2;
#   5. the report of everything finished.
# Settings are never chosen here (that is dev_study.sh); this only measures. Run it twice side by
# side on 2 cores: the two processes share the jobs (each claims one with an flock); start the
# second with DOP first (`FIRST=dop`), so its long jobs do not end the run on one core.
#   bash bench/quality/full_run.sh [preset]    (default paper-protocol; ≈ 2.5 h here with 2 processes)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
P=${1:-paper-protocol}
MAIN=nufilt,nufilt_plus,nufilt_plus_iso,opcm,magmax,weight_average,task_arithmetic
SLOW=dop,ties,wudi
ABLATION=naive,nufilt_null_only,nufilt_adapter_only
LEVERS=nufilt_rp32,nufilt_all_linear_avg,nufilt_all_linear_avg_rp32,nufilt_radius03
SETTINGS=nufilt_first_published,nufilt_all_linear,nufilt_keep_previous,nufilt_average
run() { .venv/bin/python -m bench.quality --preset "$P" "$@"; }
[ -z "${FIRST:-}" ] || run --stage merge --only "$FIRST" --orders 3
run --stage merge --only $MAIN
run --stage merge --only $SLOW --orders 3
run --stage merge --only $ABLATION --orders 3
run --stage merge --only $LEVERS,$SETTINGS --orders 3
run --report-only --only $MAIN,$SLOW,$ABLATION,$LEVERS,$SETTINGS
