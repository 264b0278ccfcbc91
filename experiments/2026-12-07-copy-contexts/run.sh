#!/usr/bin/env bash
# Issue 53 item 6: contexts where the teacher predicts rare words. First the measurement (does the
# teacher copy natural rare words from a list it has just read; what such text yields per token
# through the teacher), then a pilot whose training text is 20% such lists (of words drawn
# uniformly from the corpus's words) at the same budget of 1,700 blocks (435k tokens through the
# teacher), 3,050 steps; base is the earlier run (reused when $OUT/base/model exists).
# Run from the repository root after `make setup` and the baseline (../2026-12-07-label-rules/run.sh):
#   bash experiments/2026-12-07-copy-contexts/run.sh
set -euo pipefail
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=.
OUT=${OUT:-runs/p53}
HERE=$(dirname "$0")
.venv/bin/python "$HERE/copy_rate.py" "$OUT/base/model" "$OUT/base"
.venv/bin/python "$HERE/build_mix.py" "$OUT/base/model" runs/copy/mix.jsonl
BLOCKS="--teacher_cache --train_blocks 1700 --save_every 0"
.venv/bin/python -m analysis.pilots --out "$OUT" --steps 3050 \
    --pilot base="$BLOCKS --lr 1.5e-3" \
    --pilot copy20="$BLOCKS --lr 1.5e-3 --data runs/copy/mix.jsonl"
cp "$OUT/pilots.json" "$OUT/pilots.md" "$HERE/"
