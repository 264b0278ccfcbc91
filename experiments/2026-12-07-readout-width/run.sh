#!/usr/bin/env bash
# Issue 57 item 3: a narrower read-out, so the char path costs under 10% of the LM head at decode.
# Same budget as every issue-53 pilot (../issue53-budget.sh), reading the baseline's teacher cache;
# then decode speed of the 1,152-wide pilot, alone on the machine.
# Run from the repository root after `make setup`:  bash experiments/2026-12-07-readout-width/run.sh
source experiments/issue53-budget.sh
HERE=$(dirname "$0")
pilots "$HERE" \
    --pilot narrow1536="$CACHED --readout_width 1536" \
    --pilot narrow1152="$CACHED --readout_width 1152"
.venv/bin/spellm bench decode-speed --model "$OUT/narrow1152/model" --new_tokens 32 --repeats 6 --threads 2 \
    --batches 1 8 32 --out "$HERE/decode_speed.json"
