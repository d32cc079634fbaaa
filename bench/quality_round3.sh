#!/usr/bin/env bash
# Issue 16, round 3 (prepared 2026-12-06 for the next GPU session): one GPU call.
#   bash bench/quality_round3.sh ROUND_DIR MINUTES [--resume]
# * the strongest SASRec the round-2 sweep found (4 blocks), seeds 1-2 beside round 2's seed
#   0, and 4 blocks + dropout 0.1 on three seeds: the baseline T2Diff must beat;
# * mixed_attention_causal seed 0 again, its model.pt brought back (pack_runs --model
#   mac_serve) to export and serve the validation winner;
# * the short-history set (bench/short_history.py) on seeds 1-2 for SASRec, mixed attention
#   and t2diff_causal beside run 16's seed 0 (the stand-in for the data kept from us).
# Settings not named here are run 16's (bench/quality_round.sh).
set -euo pipefail
ROUND=$1; MINUTES=$2; shift 2
D=.gpu_data/ml-1m/sequences.tsv
python3 bench/short_history.py --data "$D" --out .gpu_data/short.tsv >/dev/null
COMMON=(--epochs 400 --batch-size 128 --lr 1e-3 --patience 10 --amp --max-minutes "$MINUTES" --resume "$@")
SETS=()
for m in sasrec_b4 sasrec_b4d1 mac_serve; do SETS+=(--set "$m:max_seq_len=200"); done
for m in sasrec_b4 sasrec_b4d1; do SETS+=(--set "$m:dense_loss=true" --set "$m:blocks=4"); done
SETS+=(--set sasrec_b4d1:dropout=0.1)
python3 bench/parallel_train.py --data "$D" --out "$ROUND/ml1m" "${COMMON[@]}" "${SETS[@]}" \
  sasrec_b4_s1=sasrec:1 sasrec_b4_s2=sasrec:2 \
  sasrec_b4d1_s0=sasrec:0 sasrec_b4d1_s1=sasrec:1 sasrec_b4d1_s2=sasrec:2 \
  mac_serve=mixed_attention_causal:0 > "$ROUND/ml1m.out" 2>&1 &
python3 bench/parallel_train.py --data .gpu_data/short.tsv --format tsv --out "$ROUND/short" \
  "${COMMON[@]}" --set sasrec:dense_loss=true \
  sasrec:1 sasrec:2 mixed_attention_causal:1 mixed_attention_causal:2 \
  t2diff_causal:1 t2diff_causal:2 > "$ROUND/short.out" 2>&1 &
wait
cat "$ROUND/ml1m.out" "$ROUND/short.out"
