#!/usr/bin/env bash
# Issue 53 item 4, the first follow-up the prototype pilot named (../2026-12-07-prototypes/): does
# training keep the prototype heads' zero-shot start when the label is the teacher's top-1? Same
# budget as every issue-53 pilot: 1,700 blocks (435k tokens through the teacher), 3,050 steps,
# reading the baseline's teacher cache. base and proto16 are the earlier runs (reused when
# runs/p53/NAME/model exists).
# Run from the repository root after `make setup`:  bash experiments/2026-12-07-prototype-followups/run.sh
set -euo pipefail
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-runs/p53}
HERE=$(dirname "$0")
BLOCKS="--teacher_cache --train_blocks 1700 --save_every 0"
C="$BLOCKS --teacher_cache_from $OUT/base"
.venv/bin/python -m analysis.pilots --out "$OUT" --steps 3050 \
    --pilot base="$BLOCKS --lr 1.5e-3" \
    --pilot proto16="$C --lr 1.5e-3 --prototypes 16" \
    --pilot proto16top1="$C --lr 1.5e-3 --prototypes 16 --label_selection teacher_top1" \
    "$@"
cp "$OUT/pilots.json" "$OUT/pilots.md" "$HERE/"
