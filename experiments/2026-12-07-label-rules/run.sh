#!/usr/bin/env bash
# Issue 53, label rules at a fixed teacher budget: 1,700 blocks (435k tokens through the teacher),
# 3,050 steps (about seven cached passes), lr 1.5e-3; every pilot reads the baseline's teacher cache.
# Run from the repository root after `make setup`:  bash experiments/2026-12-07-label-rules/run.sh
set -euo pipefail
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-runs/p53}
BASE="--teacher_cache --train_blocks 1700 --lr 1.5e-3 --save_every 0"
C="$BASE --teacher_cache_from $OUT/base"
.venv/bin/python -m analysis.pilots --out "$OUT" --steps 3050 \
    --pilot base="$BASE" \
    --pilot gate50="$C --label_gate 0.5" \
    --pilot gate30="$C --label_gate 0.3" \
    --pilot perchar="$C --label_per_char" \
    --pilot wide="$C --wide_heads" \
    "$@"
