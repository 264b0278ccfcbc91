#!/usr/bin/env bash
# Issue 53 item 4, prototype heads at the label-rules pilots' budget: 1,700 blocks (435k tokens
# through the teacher), 3,050 steps, lr 1.5e-3, reading the baseline's teacher cache
# (experiments/2026-12-07-label-rules/run.sh made runs/p53/base). One setting differs: --prototypes 16.
# Run from the repository root after `make setup`:  bash experiments/2026-12-07-prototypes/run.sh
set -euo pipefail
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-runs/p53}
BASE="--teacher_cache --train_blocks 1700 --lr 1.5e-3 --save_every 0"
C="$BASE --teacher_cache_from $OUT/base"
.venv/bin/python -m analysis.pilots --out "$OUT" --steps 3050 \
    --pilot base="$BASE" \
    --pilot proto16="$C --prototypes 16" \
    "$@"
cp "$OUT/pilots.json" "$OUT/pilots.md" experiments/2026-12-07-prototypes/
