# The two commands of the README: `make distill` (main job, embedded defaults) and `make test`.
SHELL := /bin/bash
VENV := .venv/bin
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_DATASETS_OFFLINE=1

.PHONY: setup test test-fast distill spelling-report

setup:
	bash scripts/setup.sh

test: setup
	DS_ACCELERATOR=cpu $(VENV)/python scripts/warm_deepspeed.py
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(VENV)/python -m pytest -q

# The edit-test loop: in-process tests only (no launched ranks or commands, no SLURM, not the whole corpus).
test-fast: setup
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(VENV)/python -m pytest -q -m "not processes and not slurm and not corpus"

# The reference conversion's schedule (configs/reference.yaml); `make distill SCHEDULE=` runs the
# library defaults (300 steps of new text) instead, and ARGS adds flags: ARGS="--max_steps 50".
SCHEDULE ?= --config configs/reference.yaml

# One thread per rank: on CPU the launcher would leave two per rank on a 2-core machine.
distill: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} PATH=$(CURDIR)/.venv/bin:$$PATH \
		deepspeed --num_gpus 2 launch/distill.py --deepspeed ds_configs/zero3.json $(SCHEDULE) $(ARGS)

spelling-report: setup
	$(VENV)/python launch/spelling_report.py --k 5 10 15
