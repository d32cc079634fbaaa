#!/usr/bin/env bash
# Issue 16, round 2 (2026-12-06, second session): one GPU call, every job a parallel process.
#   bash bench/quality_round2.sh ROUND_DIR MINUTES [--resume]
# * run 16's unconverged t2diff_causal seeds and t2c_onestep, resumed to early stopping
#   (their checkpoints are copied from .gpu_data/ra/ml1m when ROUND_DIR has none);
# * the recipe shared by every causal model (depth, dropout), seed 0, chosen on validation;
# * the xhat path trained at many cut points (xhat_cuts), seed 0.
# Settings not named here are run 16's (bench/quality_round.sh): window 200, batch 128,
# lr 1e-3, patience 10, every-position loss, full softmax, bf16 autocast.
set -euo pipefail
ROUND=$1; MINUTES=$2; shift 2
D=.gpu_data/ml-1m/sequences.tsv
mkdir -p "$ROUND/ml1m"
if [ -d .gpu_data/ra/ml1m ]; then
  for run in .gpu_data/ra/ml1m/*/; do
    [ -e "$ROUND/ml1m/$(basename "$run")/checkpoint.pt" ] || cp -r "$run" "$ROUND/ml1m/"
  done
fi
SETS=()
for m in t2diff_causal t2c_onestep sasrec_b4 sasrec_d3 sasrec_d1 mac_b4 mac_d3 mac_d1 \
         t2c1_b4 t2c1_d3 t2c1_cuts16 t2c1_cuts16_f5; do
  SETS+=(--set "$m:max_seq_len=200")
done
for m in t2diff_causal t2c_onestep t2c1_b4 t2c1_d3 t2c1_cuts16 t2c1_cuts16_f5; do
  SETS+=(--set "$m:diffusion_len=50")
done
for m in t2c_onestep t2c1_b4 t2c1_d3 t2c1_cuts16 t2c1_cuts16_f5; do
  SETS+=(--set "$m:tower_xhat=one_step")
done
SETS+=(--set sasrec_b4:dense_loss=true --set sasrec_d3:dense_loss=true --set sasrec_d1:dense_loss=true)
SETS+=(--set sasrec_b4:blocks=4 --set mac_b4:blocks=4 --set t2c1_b4:blocks=4)
SETS+=(--set sasrec_d3:dropout=0.3 --set mac_d3:dropout=0.3 --set t2c1_d3:dropout=0.3)
SETS+=(--set sasrec_d1:dropout=0.1 --set mac_d1:dropout=0.1)
SETS+=(--set t2c1_cuts16:xhat_cuts=16 --set t2c1_cuts16_f5:xhat_cuts=16)
SETS+=(--set t2c1_cuts16_f5:tower_xhat_min_step_frac=0.5)
python3 bench/parallel_train.py --data "$D" --out "$ROUND/ml1m" --resume \
  --epochs 400 --batch-size 128 --lr 1e-3 --patience 10 --amp --max-minutes "$MINUTES" \
  "${SETS[@]}" "$@" \
  t2diff_causal:0 t2diff_causal:1 t2diff_causal:2 t2c_onestep=t2diff_causal:0 \
  sasrec_b4=sasrec:0 sasrec_d3=sasrec:0 sasrec_d1=sasrec:0 \
  mac_b4=mixed_attention_causal:0 mac_d3=mixed_attention_causal:0 \
  mac_d1=mixed_attention_causal:0 t2c1_b4=t2diff_causal:0 t2c1_d3=t2diff_causal:0 \
  t2c1_cuts16=t2diff_causal:0 t2c1_cuts16_f5=t2diff_causal:0
# What the diffusion contributes, for every diffusion run that has stopped early: xhat
# alone as the query, and the tower fed a zero xhat (metrics-xhat-{only,zero}.json).
for run in "$ROUND"/ml1m/t2*/; do
  if grep -q '"stopped_early": true' "$run/run.json" 2>/dev/null; then
    for probe in only zero; do
      [ -e "$run/metrics-xhat-$probe.json" ] || \
        python3 -m t2diff_cli.main evaluate --run "$run" --xhat-probe "$probe" >/dev/null &
    done
  fi
done
wait
