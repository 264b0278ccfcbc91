#!/usr/bin/env bash
# Issue 57 on a CPU with native bf16 (avx512_bf16): decode speed at batch 1, 8 and 32 in fp32 and
# bf16, SpeLLM + fallback against the LM-head loop in the same run, alone on the machine. The model
# is the default recipe (read-out 2 x hidden = 1,152) at the issue-53 pilots' budget (435k teacher
# tokens, 3,050 steps, lr 1.5e-3), reading the new baseline's teacher cache
# (../2026-12-07-prototype-lr/run.sh makes it). Run from the repository root after `make setup`:
#   OUT=runs/p53v2 bash experiments/2026-12-07-decode-bf16/run.sh
set -euo pipefail
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-runs/p53v2}
D=$(dirname "$0")
[ -d "$OUT/default/model" ] || .venv/bin/python -m torch.distributed.run --nproc_per_node 2 launch/distill.py \
    --output_dir "$OUT/default" --max_steps 3050 --eval_every 3050 --save_every 0 --teacher_cache \
    --train_blocks 1700 --lr 1.5e-3 --teacher_cache_from "$OUT/base"
.venv/bin/spellm bench decode-speed --model "$OUT/default/model" --new_tokens 32 --repeats 6 --threads 2 \
    --batches 1 8 32 --out "$D/decode_speed.json"
