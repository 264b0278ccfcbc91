#!/usr/bin/env bash
# Scale evidence (issue 57 item 5): a TinyLlama-1.1B-shaped model with random weights distils 3 steps
# on 2 CPU ranks under ds_configs/zero3.json and ds_configs/zero3_offload.json (+ --teacher_offload).
set -euo pipefail
cd "$(dirname "$0")/../.."
DS_ACCELERATOR=cpu .venv/bin/python -m bench.scale --ranks 2 --steps 3 --recipe paper \
    --out experiments/2026-12-07-scale/scale.json
