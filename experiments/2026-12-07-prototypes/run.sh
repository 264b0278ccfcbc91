#!/usr/bin/env bash
# Issue 53 item 4, prototype heads at the label-rules pilots' budget (../issue53-budget.sh),
# reading the baseline's teacher cache. One setting differs: --prototypes 16.
# Run from the repository root after `make setup`:  bash experiments/2026-12-07-prototypes/run.sh
source experiments/issue53-budget.sh
pilots "$(dirname "$0")" --pilot proto16="$CACHED --prototypes 16"
