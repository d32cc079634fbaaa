#!/usr/bin/env bash
# One GPU call of the issue-16 model-quality round (2026-12-06), every job a parallel
# process on the one GPU.  Usage (on the device machine, data under .gpu_data/):
#   bash bench/quality_round.sh ROUND_DIR MINUTES [--resume]
# ML-1M at window 200 (every model with the every-position loss), the diffusion's causes
# tested on seed 0, and the short-history cut (bench/short_history.py) beside it.
set -euo pipefail
ROUND=$1; MINUTES=$2; shift 2
D=.gpu_data/ml-1m/sequences.tsv
python3 bench/short_history.py --data "$D" --out .gpu_data/short.tsv >/dev/null
COMMON=(--epochs 400 --batch-size 128 --lr 1e-3 --patience 10 --amp --max-minutes "$MINUTES" "$@")
L200=()
for m in sasrec t2diff_causal mixed_attention_causal t2c_onestep t2c_placebo t2c_xsm t2c_kllast; do
  L200+=(--set "$m:max_seq_len=200")
done
python3 bench/parallel_train.py --data "$D" --out "$ROUND/ml1m" "${COMMON[@]}" "${L200[@]}" \
  --set sasrec:dense_loss=true --set t2diff_causal:diffusion_len=50 \
  --set t2c_onestep:diffusion_len=50 --set t2c_onestep:tower_xhat=one_step \
  --set t2c_placebo:diffusion_len=50 --set t2c_placebo:diffusion_weight=0.0 \
  --set t2c_xsm:diffusion_len=50 --set t2c_xsm:xhat_softmax_weight=1.0 \
  --set t2c_kllast:diffusion_len=50 --set t2c_kllast:kl_positions=last \
  sasrec:0 sasrec:1 sasrec:2 t2diff_causal:0 t2diff_causal:1 t2diff_causal:2 \
  mixed_attention_causal:0 mixed_attention_causal:1 mixed_attention_causal:2 \
  t2c_onestep=t2diff_causal:0 t2c_placebo=t2diff_causal:0 t2c_xsm=t2diff_causal:0 \
  t2c_kllast=t2diff_causal:0 > "$ROUND/ml1m.out" 2>&1 &
python3 bench/parallel_train.py --data .gpu_data/short.tsv --format tsv --out "$ROUND/short" \
  "${COMMON[@]}" --set sasrec:dense_loss=true \
  sasrec:0 t2diff_causal:0 mixed_attention_causal:0 t2diff:0 > "$ROUND/short.out" 2>&1 &
wait
cat "$ROUND/ml1m.out" "$ROUND/short.out"
