"""spellm-ds: SpeLLM (character-level multi-head decoding) distillation on DeepSpeed.

Importing the package registers the ``spellm`` model type with transformers' Auto classes
(:mod:`spellm_ds.hf`). It sets no process-wide switch: the commands that must not reach a hub
(the Makefile's, the tests') set the offline variables themselves.
"""

from spellm_ds import hf  # noqa: F401  (registers the Auto classes)
from spellm_ds.errors import SpellmError

__all__ = ["SpellmError"]
