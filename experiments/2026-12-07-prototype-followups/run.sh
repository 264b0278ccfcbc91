#!/usr/bin/env bash
# Issue 53 item 4, the first follow-up the prototype pilot named (../2026-12-07-prototypes/): does
# training keep the prototype heads' zero-shot start when the label is the teacher's top-1? Same
# budget as every issue-53 pilot (../issue53-budget.sh), reading the baseline's teacher cache;
# proto16 is the earlier run (reused when its model exists).
# Run from the repository root after `make setup`:  bash experiments/2026-12-07-prototype-followups/run.sh
source experiments/issue53-budget.sh
pilots "$(dirname "$0")" \
    --pilot proto16="$CACHED --prototypes 16" \
    --pilot proto16top1="$CACHED --prototypes 16 --label_selection teacher_top1"
