#!/usr/bin/env bash
# Issue 53 item 5: the read-out reads the teacher's final state centred and whitened
# (--whiten_readout). Same budget as every issue-53 pilot: 1,700 blocks (435k tokens through the
# teacher), 3,050 steps, reading the baseline's teacher cache; base is the earlier run (reused when
# $OUT/base/model exists).
# Run from the repository root after `make setup`:  bash experiments/2026-12-07-whitening/run.sh
set -euo pipefail
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-runs/p53}
HERE=$(dirname "$0")
BLOCKS="--teacher_cache --train_blocks 1700 --save_every 0"
C="$BLOCKS --teacher_cache_from $OUT/base"
.venv/bin/python -m analysis.pilots --out "$OUT" --steps 3050 \
    --pilot base="$BLOCKS --lr 1.5e-3" \
    --pilot whiten="$C --lr 1.5e-3 --whiten_readout"
cp "$OUT/pilots.json" "$OUT/pilots.md" "$HERE/"
