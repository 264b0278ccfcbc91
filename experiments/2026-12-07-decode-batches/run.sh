#!/usr/bin/env bash
# Decode speed of the label-rule pilots' baseline (runs/p53/base-hf, as in ../2026-12-07-decode/) at
# batch 1, 8 and 32 with 10 interleaved rounds: SpeLLM + fallback against the LM-head loop (issue 57)
# and the export's transformers generate() against the package's loop (issue 54), alone on the machine.
set -euo pipefail
M=${M:-runs/p53/base-hf}
D=$(dirname "$0")
.venv/bin/spellm bench decode-speed --model "$M" --new_tokens 32 --repeats 10 --threads 2 --rerank_k 16 \
    --batches 1 8 32 --out "$D/decode_speed.json"
