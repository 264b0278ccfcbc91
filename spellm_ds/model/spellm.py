"""The student a distillation trains, and the exported model it becomes.

The student (:class:`Student`) is the base Hugging Face causal LM plus k char heads: the heads
read the base model's final normed hidden state. The original LM head stays (frozen; on SmolLM2
it is the tied input embedding): the distillation uses it for the token-level regularisation loss
and decoding falls back to it when the char heads are uncertain. Under the shared trunk the
student holds only what it trains and runs (:meth:`Student.drop_layers_below`).

An exported model is a transformers model of type ``spellm``
(:class:`spellm_ds.hf.SpeLLMForCausalLM`): its own config (the base model's inside), weights named
as the student's (``base.*``, ``char_heads.*``) plus every token's spelling, the tokenizer, a
generation config, a model card and the code transformers needs to load it anywhere
(:func:`save_export`). :func:`load` reads it back for this package's analyses, with the
tokenizer and the spelling table attached. Neither needs DeepSpeed.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from spellm_ds.errors import SpellmError
from spellm_ds.hf import SpeLLMConfig, SpeLLMForCausalLM
from spellm_ds.hf.char_heads import CharHeads
from spellm_ds.hf.modeling_spellm import file_sha256
from spellm_ds.model import loading as model_loading
from spellm_ds.model.charset import Charset
from spellm_ds.model.spelling import SpellingTable


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


def spellm_outputs(model, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                   with_token_logits: bool = False, trunk_hidden: torch.Tensor | None = None) -> SpeLLMOutput:
    """Char logits (and token logits) of a :class:`Student` or an exported model for ``input_ids``,
    or, with ``trunk_hidden``, from the hidden state entering the first trainable layer: the lower
    layers are frozen copies of the teacher's, so the teacher's hidden state there is exactly what
    they would compute. With no trainable layers ``trunk_hidden`` is the teacher's final normed
    hidden state: only the heads run."""
    decoder = model.base.get_decoder()
    if trunk_hidden is None:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    elif model.config.trainable_layers == 0:  # the whole decoder is the teacher's: its final state
        hidden = trunk_hidden
    else:
        first = shared_trunk_layer(len(decoder_layers_of(decoder)), model.config.trainable_layers)
        with starting_from_trunk(decoder, first, trunk_hidden):
            # inputs_embeds only sets shapes and positions: the stand-in layers replace it
            hidden = decoder(inputs_embeds=trunk_hidden, attention_mask=attention_mask).last_hidden_state
    char_logits = model.char_heads(hidden)
    token_logits = model.base.get_output_embeddings()(hidden) if with_token_logits else None
    return SpeLLMOutput(hidden, char_logits, token_logits)


class Student(nn.Module):
    """The base model plus char heads, as a distillation trains it (``config``: the
    :class:`~spellm_ds.hf.SpeLLMConfig` the export records; its ``text_config`` is ``base``'s)."""

    def __init__(self, base: nn.Module, config: SpeLLMConfig) -> None:
        super().__init__()
        if config.k < 1:
            raise SpellmError(f"k={config.k} is out of range; choose k >= 1 (the paper uses 10)")
        self.base = base
        self.config = config
        self.char_heads = CharHeads(base.config.hidden_size, config.k, len(config.charset), config.readout_width,
                                    config.wide_heads, config.prototypes).to(base.dtype)

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

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                with_token_logits: bool = False, trunk_hidden: torch.Tensor | None = None) -> SpeLLMOutput:
        return spellm_outputs(self, input_ids, attention_mask, with_token_logits, trunk_hidden)


@torch.no_grad()
def init_heads(heads: CharHeads, lm_head: torch.Tensor, table: SpellingTable,
               token_counts: torch.Tensor | None = None) -> None:
    """The informed start of ``--head_init embedding``: prototypes from LM-head rows where the heads
    have them (the most frequent tokens by ``token_counts``; none given: by token id), else the mean
    LM-head row per (position, char)."""
    if heads.prototypes:
        counts = torch.zeros(len(table.spellable)) if token_counts is None else token_counts
        heads.init_prototypes(lm_head, table.chars.cpu(), table.spellable.cpu(), counts)
    else:
        heads.init_from_embeddings(lm_head, table.chars.cpu(), table.spellable.cpu())


# ---------------------------------------------------------------------------- export and load
SPELLM_MODEL_TYPE = SpeLLMConfig.model_type
MODEL_CARD = "README.md"


def spellm_config(base_config, charset: Charset, **settings) -> SpeLLMConfig:
    """The config an exported model records: the base model's config inside, the charset's
    symbols and the recipe's settings (:meth:`spellm_ds.distill.config.RunConfig.spellm_settings`)."""
    return SpeLLMConfig(text_config=base_config.get_text_config().to_dict(), charset=list(charset.symbols),
                        **settings)


@torch.no_grad()
def build_export(config: SpeLLMConfig, base, trained: dict[str, torch.Tensor], heads_state: dict[str, torch.Tensor],
                 table: SpellingTable, token_counts: torch.Tensor | None = None) -> SpeLLMForCausalLM:
    """The exported model: ``base`` (the loaded base model, frozen weights as they are) with the
    ``trained`` base weights copied in (cast to its dtype), the char heads, the spellings and the
    training text's ``token_counts`` (the shortlist's ranking; none: not recorded)."""
    missing = sorted(set(trained) - set(base.state_dict()))
    if missing:
        raise SpellmError(f"the trained weights do not fit the base model ({missing[:3]}); export with the base "
                          "model the run was trained from")
    base.load_state_dict(trained, strict=False)
    model = SpeLLMForCausalLM(config, base=base)
    model.char_heads.load_state_dict(heads_state)
    model.char_heads.to(base.dtype)
    model.spelling_chars.copy_(table.chars)
    model.spelling_lengths.copy_(table.lengths)
    if token_counts is not None:
        model.token_counts[: len(token_counts)] = token_counts  # the text names no padding row
    model.config.dtype = base.dtype
    return model.eval()


def save_export(model: SpeLLMForCausalLM, directory: Path, tokenizer, base_dir: Path | None = None,
                max_shard_size: str = "5GB", card: str = "", changed_only: bool = False) -> None:
    """Write ``model`` like ``save_pretrained`` (sharded safetensors, ``config.json`` with its
    ``auto_map`` and the modeling code, ``generation_config.json``), plus the tokenizer and the
    model card ``card``. The generation config is the base model's (``base_dir``) if it has one.
    ``changed_only``: the weights files hold only the tensors that differ from the base model's
    files, and the config says where those are (:func:`base_reference`)."""
    from transformers import GenerationConfig

    if base_dir is not None and (Path(base_dir) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(base_dir)
    else:
        model.generation_config = GenerationConfig.from_model_config(model.config.get_text_config())
    model.generation_config.eos_token_id = model.generation_config.eos_token_id or tokenizer.eos_token_id
    state = None
    if changed_only:
        if base_dir is None:
            raise ValueError("an export of only what changed needs the base model's directory")
        state = changed_tensors(model, Path(base_dir))
        model.config.base_weights = base_reference(Path(base_dir))
    model.save_pretrained(directory, max_shard_size=max_shard_size, state_dict=state)
    tokenizer.save_pretrained(directory)
    if card:
        (directory / MODEL_CARD).write_text(card)


def base_reference(base_dir: Path) -> dict:
    """Where an export of only what changed finds the rest: the base model's directory, its Hub ID
    and revision where it is a snapshot in the Hugging Face cache, and each weight file's sha256."""
    path = base_dir.resolve()
    files = sorted(path.glob("*.safetensors"))
    reference = {"path": str(path), "sha256": {file.name: file_sha256(file) for file in files}}
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        reference["hub_id"] = path.parent.parent.name.removeprefix("models--").replace("--", "/")
        reference["revision"] = path.name
    return reference


@torch.no_grad()
def changed_tensors(model: SpeLLMForCausalLM, base_dir: Path) -> dict[str, torch.Tensor]:
    """``model``'s tensors that the base model's files do not hold as they are (compared value by
    value, not assumed from the recipe): the char heads, the spellings, any trained layer."""
    from transformers import AutoModelForCausalLM

    base = model_loading.from_pretrained(AutoModelForCausalLM, base_dir, dtype="auto")
    prefix = model.base_model_prefix + "."
    original = {prefix + name: tensor for name, tensor in base.state_dict().items()}
    return {name: tensor for name, tensor in model.state_dict().items()
            if name not in original or not torch.equal(original[name], tensor)}


def read_spellm_config(directory: Path) -> SpeLLMConfig:
    """The config of an exported SpeLLM directory; a clear error for anything else."""
    path = Path(directory) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpellmError(f"{directory} is not a model directory (no config.json); pass a directory written by "
                          "distill or export") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SpellmError(f"{path} is not readable JSON ({e}); re-export the model") from None
    if not isinstance(raw, dict) or raw.get("model_type") != SPELLM_MODEL_TYPE:
        raise SpellmError(f"{directory} is not a SpeLLM model (config.json model_type "
                          f"{raw.get('model_type') if isinstance(raw, dict) else None!r}, not {SPELLM_MODEL_TYPE!r}); "
                          "pass a directory written by distill or export")
    try:
        return SpeLLMConfig.from_pretrained(directory)
    except (TypeError, ValueError, KeyError) as e:
        raise SpellmError(f"{path} is not a valid SpeLLM config ({e}); re-export the model") from None


def load(directory: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
         shortlist: int = 0):
    """An exported model for this package's analyses and decoding, in eval mode, with its tokenizer
    (``model.tokenizer``) and spelling table with charset (``model.spelling``) attached. ``dtype``
    ``"auto"``: :func:`spellm_ds.runtime.precision.inference_dtype` of the model's own on ``device``.
    ``shortlist``: the caller will decode with one, which needs the token counts an export records."""
    from spellm_ds.data.assets import load_tokenizer
    from spellm_ds.runtime.precision import inference_dtype

    directory = Path(directory)
    config = read_spellm_config(directory)
    if isinstance(dtype, str):
        dtype = inference_dtype(dtype, config.dtype or torch.float32, torch.device(device).type)
    model = model_loading.from_pretrained(SpeLLMForCausalLM, directory, config=config, dtype=dtype).to(device).eval()
    if shortlist and not bool(model.token_counts.any()):
        raise SpellmError(f"{directory} records no token counts, which --shortlist ranks tokens by (it was exported "
                          "before they were); re-export it from its checkpoint with launch/export.py, or drop "
                          "--shortlist")
    return with_tokenizer(model, load_tokenizer(directory))


def load_teacher(student: SpeLLMForCausalLM, name: str | None = None):
    """The model ``student`` was distilled from (or the model ``name``), in eval mode, in the
    student's dtype on its device."""
    from transformers import AutoModelForCausalLM

    from spellm_ds.data.assets import resolve_model

    teacher = model_loading.from_pretrained(AutoModelForCausalLM, resolve_model(name or student.config.teacher),
                                            dtype=student.dtype)
    return teacher.to(student.device).eval()


def with_tokenizer(model: SpeLLMForCausalLM, tokenizer) -> SpeLLMForCausalLM:
    """``model`` with ``tokenizer`` and its spelling table with charset (``model.spelling``) attached."""
    model.tokenizer = tokenizer
    charset = Charset(tuple(model.config.charset))
    model.spelling = SpellingTable.from_chars(len(charset), model.spelling_chars.cpu(), model.spelling_lengths.cpu(),
                                              charset=charset).to(model.spelling_chars.device)
    return model


@torch.no_grad()
def untrained(base_dir: str | Path, charset: Charset | None = None, token_counts: torch.Tensor | None = None,
              **settings) -> SpeLLMForCausalLM:
    """A SpeLLM model around the base model in ``base_dir`` whose heads are as a distillation
    starts them (``head_init``), untrained: for tests and benchmarks, with its tokenizer attached
    (and ``token_counts`` recorded where given)."""
    from transformers import AutoModelForCausalLM

    from spellm_ds.data.assets import load_tokenizer
    from spellm_ds.model.spelling import model_vocab_size

    base = model_loading.from_pretrained(AutoModelForCausalLM, base_dir)
    tokenizer = load_tokenizer(base_dir)
    charset = charset or Charset.default()
    config = spellm_config(base.config, charset, **{"teacher": str(base_dir), **settings})
    table = SpellingTable.from_tokenizer(tokenizer, charset, config.k, model_vocab_size(base.config))
    student = Student(base, config)
    if config.head_init == "embedding":
        init_heads(student.char_heads, base.get_output_embeddings().weight.float(), table)
    return with_tokenizer(build_export(config, base, {}, student.char_heads.state_dict(), table, token_counts),
                          tokenizer)
