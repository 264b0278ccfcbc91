#!/usr/bin/env bash
# Issue 53 item 5: the read-out reads the teacher's final state centred and whitened
# (--whiten_readout). Same budget as every issue-53 pilot (../issue53-budget.sh), reading the
# baseline's teacher cache.
# Run from the repository root after `make setup`:  bash experiments/2026-12-07-whitening/run.sh
source experiments/issue53-budget.sh
pilots "$(dirname "$0")" --pilot whiten="$CACHED --whiten_readout"
