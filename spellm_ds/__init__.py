"""spellm-ds: SpeLLM (character-level multi-head decoding) distillation on DeepSpeed.

This package never reaches a model hub: everything it loads is local (the embedded SmolLM2
model, the packaged corpus, or paths the user gives). The offline switches are set here, before
huggingface_hub reads them, so an accidental hub lookup fails fast instead of hanging.
"""

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

from spellm_ds.errors import SpellmError  # noqa: E402

__all__ = ["SpellmError"]
