#!/usr/bin/env bash
# Issue 53, label rules at a fixed teacher budget (../issue53-budget.sh); every pilot reads the
# baseline's teacher cache.
# Run from the repository root after `make setup`:  bash experiments/2026-12-07-label-rules/run.sh
source experiments/issue53-budget.sh
pilots "$(dirname "$0")" \
    --pilot gate50="$CACHED --label_gate 0.5" \
    --pilot gate30="$CACHED --label_gate 0.3" \
    --pilot perchar="$CACHED --label_per_char" \
    --pilot wide="$CACHED --wide_heads"
