#!/usr/bin/env bash
# The shortlist as a decoding option (issues 53 and 57), 2026-12-08: the issue-53 baseline re-exported
# with its training text's token counts, then agreement, ranking, fallback signals and speed.
# Needs the baseline's run (OUT/base: checkpoints and teacher cache; ../2026-12-07-prototype-lr/run.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/p53v2}
HERE=experiments/2026-12-08-shortlist-decoding
MODEL=$OUT/base/model-counts
export PYTHONPATH=. HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python launch/export.py --checkpoint "$OUT/base/checkpoints/step3050" --out "$MODEL"
.venv/bin/python $HERE/agreement.py "$MODEL" "$OUT/base/teacher_cache" 8192 $HERE/agreement-base.json 0 250 1000 2000
.venv/bin/python $HERE/ranking.py "$MODEL" "$OUT/base" $HERE/ranking.json
.venv/bin/python $HERE/signals.py "$MODEL" 8192 1000 $HERE/signals-base.json
.venv/bin/python -m bench.operating_points --model "$MODEL" --taus 0 0.1 0.22 0.5 1 none --shortlist 1000 \
    --max_tokens 8192 --batch 8 --new_tokens 64 --repeats 6 --out $HERE/operating_points-base.json
.venv/bin/python -m bench.decode_speed --model "$MODEL" --shortlist 1000 --new_tokens 32 --repeats 6 --threads 2 \
    --batches 1 8 32 --dtypes fp32 bf16 --out $HERE/decode_speed-base.json
