#!/usr/bin/env bash
# The 8-task dev study: the 4 dev tasks plus 4 proxy tasks that are not among the
# benchmark's 8 (config.DEV_TASKS + config.PROXY_TASKS), orders 0-2, so that settings are chosen
# under 8-task interference without looking at the 4 held-out tasks.
# Writes bench/results/dev8-<preset>.{json,md,png}. Two runs side by side share the jobs.
#   bash bench/quality/dev8_study.sh [preset ...]     (default: both paper presets; ~1 h on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
TASKS=rotten,debates,fortunes_b,wn_verb,bbc,fortunes_c,roget,moral  # config.DEV_TASKS + config.PROXY_TASKS
# the paper's NUFILT, profiles plus and plus-iso, the trust radius alone (0.03, 0.05), OPCM, and on top of
# plus-iso as it merges full fine-tunes: without the adapter, rescaled to OPCM's target, a two-sided filter,
# and both; the two-sided filter at OPCM's target without the flat spectrum
# (plus-iso's adapter rule); with adapters, plus-iso merging them as full fine-tunes beside it (the levers that
# lost here were removed: bench/quality/README.md)
VARIANTS=nufilt,nufilt_plus,nufilt_plus_iso,nufilt_radius03,nufilt_radius05,opcm,nufilt_plus_iso_null_only
VARIANTS=$VARIANTS,nufilt_plus_iso_r00,nufilt_plus_iso_two_sided
VARIANTS=$VARIANTS,nufilt_plus_iso_two_sided_r00,nufilt_plus_two_sided_r00
presets=("$@")
[ ${#presets[@]} -gt 0 ] || presets=(paper-protocol paper-protocol-gentle)
for p in "${presets[@]}"; do
  as_full=""  # the same model as plus-iso unless the arrivals are adapters
  [ "$p" != lora ] || as_full=,nufilt_plus_iso_as_full
  .venv/bin/python -m bench.quality --preset "$p" --tasks $TASKS --orders 3 --name "dev8-$p" --only $VARIANTS$as_full
done
