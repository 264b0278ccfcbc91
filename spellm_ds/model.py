"""SpeLLMForCausalLM: a Hugging Face causal LM plus k character heads.

The heads read the base model's final normed hidden state. The original LM head stays (frozen;
on SmolLM2 it is the tied input embedding): the distillation uses it for the token-level
regularisation loss and decoding falls back to it when the char heads are uncertain.

A saved SpeLLM directory is an ordinary HF model directory (``config.json``,
``model.safetensors``, tokenizer) holding the student's full weights, plus ``char_heads.safetensors``,
``spellm_config.json`` (k, trainable layers, head init, the teacher it came from) and
``charset.json``. It loads on one process without DeepSpeed.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spellm_ds.charset import Charset
from spellm_ds.decoding import CharDecoder, GenerationOutput, generate
from spellm_ds.errors import SpellmError
from spellm_ds.heads import CharHeads
from spellm_ds.losses import LabelRule, label_rule_of
from spellm_ds.spelling import SpellingTable, model_vocab_size

SPELLM_CONFIG_FILE = "spellm_config.json"
HEADS_FILE = "char_heads.safetensors"
BASE_WEIGHTS_FILE = "model.safetensors"


@dataclass
class SpeLLMConfig:
    k: int = 10
    trainable_layers: int = 5
    train_attention: bool = False
    """Beyond the paper: the attention blocks of the trainable layers train too."""
    head_init: str = "embedding"
    readout_width: int = 0
    """Beyond the paper: the width of a residual MLP read-out before the heads (0: none)."""
    teacher: str = ""
    """The model this student was distilled from: the embedded name or a directory path."""
    label_selection: str = "joint"
    """The label rule it was trained with (:data:`spellm_ds.losses.LABEL_RULES`); analysis uses the same."""
    label_prior_weight: float = 1.0
    label_per_char: bool = False
    label_gate: float | None = None
    ignore_after_end: bool = False
    """Whether training ignored the characters after a label's first END."""
    spelling_temperature: float = 1.0
    """The char heads' token distribution's temperature (scoring and sampling), fitted on held-out
    text at export (:mod:`spellm_ds.calibration`); 1: as trained."""

    def label_rule(self) -> LabelRule:
        return label_rule_of(self)

    def save(self, directory: Path) -> None:
        (directory / SPELLM_CONFIG_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> SpeLLMConfig:
        path = directory / SPELLM_CONFIG_FILE
        if not path.is_file():
            raise SpellmError(f"{directory} is not a SpeLLM model directory (no {SPELLM_CONFIG_FILE}); "
                              "pass a directory written by distill/export")
        return cls(**json.loads(path.read_text()))


class SpeLLMOutput(NamedTuple):
    hidden: torch.Tensor  # [B, T, d] final normed hidden state
    char_logits: torch.Tensor  # [B, T, k, C]
    token_logits: torch.Tensor | None  # [B, T, V] from the frozen LM head, when asked for


def decoder_layers(base: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks of an HF causal LM (Llama/Mistral/Qwen ``layers``, GPT-2 ``h``)."""
    return decoder_layers_of(base.get_decoder())


def _child(module: nn.Module, names: tuple[str, ...], kind: type, what: str) -> nn.Module:
    """The first submodule of ``module`` called one of ``names`` (HF families name them differently)."""
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, kind):
            return child
    raise SpellmError(f"cannot find the {what} of {type(module).__name__}; it needs a {names[0]!r} submodule")


def decoder_layers_of(decoder: nn.Module) -> nn.ModuleList:
    return _child(decoder, ("layers", "h", "blocks"), nn.ModuleList, "decoder layers")


def feed_forward(layer: nn.Module) -> nn.Module:
    return _child(layer, ("mlp", "feed_forward", "ffn"), nn.Module, "FFN block")


def attention(layer: nn.Module) -> nn.Module:
    return _child(layer, ("self_attn", "attn", "attention"), nn.Module, "attention block")


def shared_trunk_layer(num_layers: int, trainable_layers: int) -> int | None:
    """The layer a student can start from the teacher's hidden state at, or None when there is
    no frozen lower layer to share (all layers train). ``num_layers`` (``trainable_layers`` 0)
    means the whole decoder is shared: the student reads the teacher's final normed hidden state."""
    first_trainable = num_layers - trainable_layers
    return first_trainable if 0 < first_trainable <= num_layers else None


def _check_trunk_layer(first_layer: int | None, num_layers: int) -> None:
    if first_layer is None or not 0 < first_layer <= num_layers:
        raise SpellmError(f"a shared trunk starts at a layer in 1..{num_layers}, got {first_layer}")


class _TrunkOutput(nn.Module):
    """Stands in for a frozen lower layer: whatever it is given, it returns the hidden state the
    teacher computed entering the first trainable layer."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.hidden


class _RunsInTheTeacher(nn.Module):
    """Holds the place of a module the student let go of (:meth:`SpeLLMForCausalLM.drop_layers_below`,
    :meth:`SpeLLMForCausalLM.drop_token_embeddings`)."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        raise SpellmError("this part of the student was dropped (shared trunk: the teacher runs its lower layers "
                          "and embeds the tokens); call it with trunk_hidden, or build it without the shared trunk")


@contextmanager
def starting_from_trunk(decoder: nn.Module, first_layer: int | None, trunk_hidden: torch.Tensor):
    """Run ``decoder`` from ``trunk_hidden`` at ``first_layer``: the layers below return it unchanged.

    The decoder still runs its own embedding step (GPT-2 adds learned positions, Gemma scales), its
    masks and position encodings, and indexes per-layer settings (Qwen2's sliding-window layer types)
    by the true layer number; only the stand-ins' output reaches the layers that run.
    """
    layers = decoder_layers_of(decoder)
    _check_trunk_layer(first_layer, len(layers) - 1)  # from the last layer on, the stand-ins would skip the norm
    name = next(key for key, value in decoder.named_children() if value is layers)
    stand_in = _TrunkOutput(trunk_hidden)
    setattr(decoder, name, nn.ModuleList([stand_in] * first_layer + list(layers)[first_layer:]))
    try:
        yield
    finally:
        setattr(decoder, name, layers)


class SpeLLMForCausalLM(nn.Module):
    def __init__(self, base: nn.Module, config: SpeLLMConfig, charset: Charset) -> None:
        super().__init__()
        if config.k < 1:
            raise SpellmError(f"k={config.k} is out of range; choose k >= 1 (the paper uses 10)")
        self.base = base
        self.config = config
        self.charset = charset
        self.char_heads = CharHeads(base.config.hidden_size, config.k, len(charset),
                                    config.readout_width).to(base.dtype)
        self.tokenizer = None
        self.spelling: SpellingTable | None = None

    # ----------------------------------------------------------------- training set-up
    def freeze_for_distillation(self) -> int:
        """Train only the char heads and the FFN blocks (and with ``train_attention`` the attention
        blocks) of the last ``trainable_layers`` layers.

        Returns the number of trainable parameters.
        """
        layers = decoder_layers(self.base)
        n = self.config.trainable_layers
        if not 0 <= n <= len(layers):
            raise SpellmError(f"--trainable_layers {n} is out of range; the model has {len(layers)} layers")
        self.requires_grad_(False)
        self.char_heads.requires_grad_(True)
        for layer in list(layers)[len(layers) - n:]:
            feed_forward(layer).requires_grad_(True)
            if self.config.train_attention:
                attention(layer).requires_grad_(True)
        return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                   for p in self.parameters() if p.requires_grad)

    def drop_layers_below(self, first_layer: int) -> None:
        """Let go of the frozen layers below ``first_layer`` when the teacher runs them (the shared
        trunk): the student then holds only what it runs. Under ZeRO-3 this matters every step, as
        the optimizer step releases and re-gathers every persistent parameter of the engine, used
        or not (on SmolLM2 the 25 lower layers are 65% of them); on a large model they are most of
        the student's memory. The model then runs only from ``trunk_hidden``; checkpoints never stored
        frozen parameters and export copies them from the base model's files."""
        layers = decoder_layers(self.base)
        _check_trunk_layer(first_layer, len(layers))
        if any(p.requires_grad for layer in list(layers)[:first_layer] for p in layer.parameters()):
            raise SpellmError(f"layers below {first_layer} train, so the teacher cannot run them; "
                              "call freeze_for_distillation first")
        for index in range(first_layer):
            layers[index] = _RunsInTheTeacher()

    def drop_token_embeddings(self, keep_lm_head: bool) -> None:
        """Let go of the token embedding, and of the LM head unless the loss needs token logits
        (``keep_lm_head``): a student that starts from the teacher's hidden state (the shared
        trunk) never embeds a token. In the default recipe SmolLM2's tied embedding was 90% of what
        the student held (28M of 31.6M parameters), all of it unused; on a large model it is
        gigabytes per student. A tied LM head that stays keeps the shared weight."""
        if self.base.get_input_embeddings().weight.requires_grad:
            raise SpellmError("the token embedding trains, so the student cannot drop it")
        self.base.set_input_embeddings(_RunsInTheTeacher())
        if not keep_lm_head:
            self.base.set_output_embeddings(_RunsInTheTeacher())

    def trainable_parameter_names(self) -> list[str]:
        return [name for name, p in self.named_parameters() if p.requires_grad]

    # ----------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                with_token_logits: bool = False, trunk_hidden: torch.Tensor | None = None) -> SpeLLMOutput:
        """Char logits (and token logits) for ``input_ids``, or, with ``trunk_hidden``, from the
        hidden state entering the first trainable layer: the lower layers are frozen copies of the
        teacher's, so the teacher's hidden state there is exactly what they would compute. With no
        trainable layers ``trunk_hidden`` is the teacher's final normed hidden state: only the heads run."""
        decoder = self.base.get_decoder()
        if trunk_hidden is None:
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        elif self.config.trainable_layers == 0:  # the whole decoder is the teacher's: its final state
            hidden = trunk_hidden
        else:
            first = shared_trunk_layer(len(decoder_layers_of(decoder)), self.config.trainable_layers)
            with starting_from_trunk(decoder, first, trunk_hidden):
                # inputs_embeds only sets shapes and positions: the stand-in layers replace it
                hidden = decoder(inputs_embeds=trunk_hidden, attention_mask=attention_mask).last_hidden_state
        char_logits = self.char_heads(hidden)
        token_logits = self.base.get_output_embeddings()(hidden) if with_token_logits else None
        return SpeLLMOutput(hidden, char_logits, token_logits)

    # ----------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        """Write the full model (weights must be whole, not ZeRO-3 partitions)."""
        write_directory(Path(directory), self.base.config, self.config, self.charset,
                        base_state={n: p.detach() for n, p in self.base.named_parameters()},
                        heads_state=self.char_heads.state_dict(), tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype = torch.float32) -> SpeLLMForCausalLM:
        """Load a saved SpeLLM directory; with its tokenizer, ``generate`` is ready to use."""
        from transformers import AutoModelForCausalLM

        from spellm_ds.assets import load_tokenizer

        directory = Path(directory)
        config = SpeLLMConfig.load(directory)
        base = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        model = cls(base, config, Charset.load(directory))
        model.char_heads.load_state_dict(load_file(directory / HEADS_FILE))
        model.attach_tokenizer(load_tokenizer(directory))
        return model.to(dtype).eval()

    # ----------------------------------------------------------------- decoding
    def attach_tokenizer(self, tokenizer) -> None:
        """Build the spelling table that decoding maps characters back to tokens with."""
        self.tokenizer = tokenizer
        self.spelling = SpellingTable.from_tokenizer(tokenizer, self.charset, self.config.k,
                                                     model_vocab_size(self.base.config))

    def char_decoder(self, tau: float | None = 0.22) -> CharDecoder:
        if self.spelling is None:
            raise SpellmError("this model has no tokenizer attached; call attach_tokenizer(tokenizer) first")
        return CharDecoder(self.spelling, tau, self.config.spelling_temperature).to(self.base.device)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 64, tau: float | None = 0.22, **sampling) -> GenerationOutput:
        """Greedy (or ``do_sample=True`` with temperature/top_k/top_p) decoding with the char
        heads, AutoCorrect and entropy fallback (``rerank_k=K``: greedy, re-ranked by the LM head;
        :func:`spellm_ds.decoding.spellm_picker`); returns new ids and each token's provenance."""
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        return generate(self, self.char_decoder(tau), input_ids, attention_mask, max_new_tokens,
                        eos_token_id=sampling.pop("eos_token_id", eos), **sampling)


def write_directory(directory: Path, base_config, config: SpeLLMConfig, charset: Charset,
                    base_state: dict[str, torch.Tensor], heads_state: dict[str, torch.Tensor],
                    tokenizer=None) -> None:
    """Write a SpeLLM directory from whole state dicts (shared by save_pretrained and export).

    ``base_state`` comes from ``named_parameters()``, which lists a tied LM head once, as HF
    checkpoints do; ``from_pretrained`` re-ties it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    base_config.save_pretrained(directory)
    save_file({n: t.contiguous().cpu() for n, t in base_state.items()}, directory / BASE_WEIGHTS_FILE,
              metadata={"format": "pt"})
    save_file({n: t.contiguous().cpu() for n, t in heads_state.items()}, directory / HEADS_FILE,
              metadata={"format": "pt"})
    config.save(directory)
    charset.save(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
