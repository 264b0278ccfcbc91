#!/usr/bin/env bash
# Decode speed and operating points of the label-rule pilots' baseline (runs/p53/base, re-exported with
# `spellm export --checkpoint runs/p53/base --out runs/p53/base-hf`), alone on the machine.
set -euo pipefail
M=${M:-runs/p53/base-hf}
D=experiments/2026-12-07-decode
.venv/bin/spellm bench decode-speed --model "$M" --new_tokens 32 --repeats 6 --threads 2 --rerank_k 16 --out $D/decode_speed.json
.venv/bin/spellm bench operating-points --model "$M" --rerank_k 16 --new_tokens 32 --batch 8 --repeats 6 --threads 2 \
    --out $D/operating_points.json
