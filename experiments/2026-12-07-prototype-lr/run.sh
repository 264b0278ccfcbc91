#!/usr/bin/env bash
# Issue 53 item 4, the follow-up ../2026-12-07-prototype-followups/ named: prototype heads start at
# 58.8% exact and training takes them down to 55%. Does a lower learning rate for the prototype rows
# alone (--head_lr; the read-out stays at --lr) keep the start? Same budget as every issue-53 pilot
# (../issue53-budget.sh), a new baseline (blocks sampled as pieces, PACKING_VERSION 2), reading the
# baseline's teacher cache. Run from the repository root after `make setup`:
#   OUT=runs/p53v2 bash experiments/2026-12-07-prototype-lr/run.sh
source experiments/issue53-budget.sh
pilots "$(dirname "$0")" \
    --pilot proto16="$CACHED --prototypes 16" \
    --pilot proto16-rows1.5e-4="$CACHED --prototypes 16 --head_lr 1.5e-4" \
    --pilot proto16-rows1.5e-5="$CACHED --prototypes 16 --head_lr 1.5e-5"
