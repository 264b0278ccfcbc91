#!/usr/bin/env bash
# Issue 56: 300 steps of the default recipe before and after the package was split by stage give the
# same exported model. Each run from a worktree of its commit (PYTHONPATH puts that tree's package first).
# Run from the repository root after `make setup`:  bash experiments/2026-12-07-layout-bitwise/run.sh
set -euo pipefail
ROOT=$(pwd)
run() {  # commit output_dir port
    git worktree add -f "/tmp/bitwise-$1" "$1"
    (cd "/tmp/bitwise-$1" && PYTHONPATH="/tmp/bitwise-$1" DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 \
        TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$ROOT/.venv/bin/python" -m torch.distributed.run \
        --nproc_per_node 2 --master_port "$3" launch/distill.py --output_dir "$ROOT/$2" --max_steps 300 --resume none)
    git worktree remove --force "/tmp/bitwise-$1"
}
run 1e53dcc runs/bitwise/before 29611   # the last commit before the split
run e874468 runs/bitwise/after 29612    # after it (and with --prototypes added, off)
.venv/bin/python experiments/2026-12-07-layout-bitwise/compare.py > experiments/2026-12-07-layout-bitwise/comparison.json
