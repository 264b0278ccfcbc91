"""SpeLLM's configuration for transformers: the base model's own config plus the char heads'.

Copied into every exported model (``trust_remote_code``); importing :mod:`spellm_ds` registers it
as model type ``spellm`` instead.
"""

from __future__ import annotations

import math

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .char_decoding import DEFAULT_TAU


class SpeLLMConfig(PretrainedConfig):
    """``text_config`` is the base causal LM's config (any family); the rest describe the char
    heads, how they were trained and how they decode (``tau``, ``rerank_k``, ``shortlist``: the defaults of
    ``generate()`` and of the distribution ``forward()`` returns)."""

    model_type = "spellm"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PretrainedConfig | None = None
    k: int = 10
    """Characters per token = char heads."""
    charset: list[str] | None = None
    """The symbols the heads predict, in char-id order (``<end>``, ``<unk>``, ...)."""
    readout_width: int = 0
    """Beyond the paper: the width of a residual MLP read-out before the heads (0: none)."""
    wide_heads: bool = False
    """Beyond the paper: the read-out's hidden layer also feeds the char logits directly."""
    prototypes: int = 0
    """Beyond the paper: each head scores a character by the max of this many prototype rows (0: one linear row)."""
    trainable_layers: int = 5
    """The last decoder layers whose FFN blocks trained (0: the trunk is the teacher's)."""
    train_attention: bool = False
    """Beyond the paper: the attention blocks of the trainable layers trained too."""
    head_init: str = "embedding"
    teacher: str = ""
    """The model this one was distilled from: the embedded name, a directory or a Hub ID."""
    label_selection: str = "joint"
    """The label rule it was trained with; analysis uses the same."""
    label_prior_weight: float = 1.0
    label_per_char: bool = False
    label_gate: float | None = None
    ignore_after_end: bool = False
    """Whether training ignored the characters after a label's first END."""
    spelling_temperature: float = 1.0
    """The char heads' token distribution's temperature (scoring and sampling), fitted on held-out
    text at export; 1: as trained."""
    tau: float | None = DEFAULT_TAU
    """Fall back to the LM head at this mean head entropy (nats); None: never."""
    rerank_k: int = 0
    """Beyond the paper: re-rank the heads' top-K valid spellings by the LM head (0: off)."""
    shortlist: int = 0
    """Beyond the paper: the LM head also scores this many of the tokens most frequent in the
    training text (``token_counts``) where the heads decide (0: off)."""
    base_weights: dict | None = None
    """Set where the export stores only what changed (``launch/export.py --changed_only``): where
    the base model's weights are (``path``; ``hub_id`` and ``revision`` when they came from the
    Hub) and each weight file's ``sha256``. ``from_pretrained`` loads them from there, checks them
    and puts this directory's tensors over them."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_values()

    def check_values(self) -> None:
        """A ValueError naming the first value no export writes (a hand-edited or corrupt
        ``config.json``), instead of a crash deep inside the model."""
        for name, least in (("k", 1), ("readout_width", 0), ("trainable_layers", 0), ("rerank_k", 0),
                            ("shortlist", 0), ("prototypes", 0)):
            value = getattr(self, name)
            if type(value) is not int or value < least:
                raise ValueError(f"{name} {value!r} is not an integer >= {least}")
        if self.prototypes and self.wide_heads:
            raise ValueError("prototypes and wide_heads do not combine")
        charset = self.charset
        if charset is not None and (not isinstance(charset, (list, tuple)) or len(charset) < 2
                                    or not all(isinstance(symbol, str) for symbol in charset)):
            raise ValueError("charset must list its symbols as strings, at least <end> and <unk>")
        if not _finite(self.spelling_temperature) or self.spelling_temperature <= 0:
            raise ValueError(f"spelling_temperature {self.spelling_temperature!r} is not a positive number")
        if self.tau is not None and (not _finite(self.tau) or self.tau < 0):
            raise ValueError(f"tau {self.tau!r} is not a number >= 0 or null")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
