# The budget every issue-53 pilot shares, sourced by experiments/2026-12-07-*/run.sh from the
# repository root: 1,700 training blocks (435k tokens through the teacher), 3,050 steps (about
# seven cached passes), lr 1.5e-3, the read-out 2,304 wide (the default when the pilots began).
# BUDGET: the baseline's flags; CACHED: the same, reading the baseline's teacher cache.
# pilots HERE [--pilot NAME=FLAGS]...: the baseline and the given pilots, trained where their model
# is missing, scored together on the same held-out positions; the tables copied into HERE as
# $TABLE.json and $TABLE.md (TABLE=pilots unless set).
set -euo pipefail
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-runs/p53}
BUDGET="--teacher_cache --train_blocks 1700 --save_every 0 --lr 1.5e-3 --readout_width 2304"
CACHED="$BUDGET --teacher_cache_from $OUT/base"

pilots() {
    local here=$1
    shift
    .venv/bin/python -m analysis.pilots --out "$OUT" --steps 3050 --pilot base="$BUDGET" "$@"
    cp "$OUT/pilots.json" "$here/${TABLE:-pilots}.json"
    cp "$OUT/pilots.md" "$here/${TABLE:-pilots}.md"
}
