"""The two DeepSpeed engines of a distillation: the frozen teacher and the student.

Both models are built under ``HfDeepSpeedConfig`` so ZeRO-3 loads their weights partitioned;
the teacher gets no optimizer, the student optimises only what ``freeze_for_distillation`` leaves
trainable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from spellm_ds.distill.config import RunConfig, mixed_precision_dtype
from spellm_ds.model import loading as model_loading
from spellm_ds.model.charset import Charset
from spellm_ds.model.spelling import SpellingTable
from spellm_ds.model.spellm import Student, init_heads


def load_base(model_dir: Path, ds_config: dict[str, Any]):
    # HfDeepSpeedConfig must stay alive while from_pretrained runs so weights load partitioned.
    keep_alive = HfDeepSpeedConfig(ds_config)
    base = model_loading.from_pretrained(AutoModelForCausalLM, model_dir, dtype=mixed_precision_dtype(ds_config))
    del keep_alive
    return base


def build_teacher(model_dir: Path, ds_config: dict[str, Any]):
    teacher = load_base(model_dir, ds_config)
    teacher.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=teacher, config=ds_config)
    engine.eval()
    keep_whole_without_hooks(engine)
    return engine


def held_parameter_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(bytes of parameters this rank holds now, bytes of the whole model's parameters).

    A ZeRO-3 parameter holds its shard (``ds_tensor``) plus, while gathered or persistent, the
    whole tensor; any other parameter is held whole. Outside a forward pass, the first number
    about 1/world of the second is the evidence that ZeRO-3 partitions the model."""
    held = whole = 0
    for p in module.parameters():
        size = p.element_size()
        if hasattr(p, "ds_tensor"):
            held += (p.ds_tensor.numel() + p.data.numel()) * size
            whole += p.ds_numel * size
        else:
            held += p.numel() * size
            whole += p.numel() * size
    return held, whole


def keep_whole_without_hooks(engine) -> bool:
    """Gather a frozen ZeRO-3 engine's parameters once and remove its per-module hooks, when every
    parameter persists (the ``"auto"`` persistence threshold on a model that fits, see
    :func:`spellm_ds.distill.config.auto_persistence_threshold`).

    Such an engine never needs another gather, yet DeepSpeed's hooks still run around every module
    call: measured on SmolLM2-135M, the ZeRO-3 teacher took 2.10 s per step and the same teacher at
    stage 0 1.23 s. A model too large to persist keeps its hooks and its sharding. Returns whether
    the hooks were removed."""
    params = list(engine.module.parameters())
    offload = engine.optimizer
    if not params or not isinstance(offload, DeepSpeedZeRoOffload) or not all(p.ds_persist for p in params):
        return False
    params[0].all_gather(param_list=params)
    offload.destroy()  # removes the module hooks; persistent parameters are never released
    return True


def parameter_groups(model: Student, run: RunConfig) -> list:
    """The trainable parameters: the char heads at ``--lr``, their output rows at ``--head_lr`` and the
    pretrained blocks that train at ``--ffn_lr``, each group where its flag is set, in the order of the
    scheduler's peak list (:func:`spellm_ds.distill.config.resolve_student_config`); one plain list
    when only ``--lr`` applies."""
    heads = {id(p) for p in model.char_heads.parameters()}
    rows = {id(p) for p in model.char_heads.proj.parameters()} if run.head_lr is not None else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [([p for p in trainable if id(p) in heads - rows], run.lr),
              ([p for p in trainable if id(p) in rows], run.head_lr),
              ([p for p in trainable if id(p) not in heads], run.ffn_lr)]
    groups = [{"params": params, "lr": lr} for params, lr in groups if lr is not None]
    return groups if len(groups) > 1 else groups[0]["params"]


def build_student(model_dir: Path, ds_config: dict[str, Any], run: RunConfig, charset: Charset,
                  table: SpellingTable, trunk_layer: int | None, token_counts: torch.Tensor):
    """The student engine; prints the trainable share on rank 0. With ``trunk_layer`` (the shared
    trunk) it holds no layers below it (the teacher runs them), no token embedding, and no LM head
    unless the loss needs token logits. ``token_counts`` (per token, in the training text) choose
    the prototypes' tokens (``--prototypes``)."""
    base = load_base(model_dir, ds_config)
    torch.manual_seed(run.seed)  # identical head init on every rank
    model = Student(base, run.spellm_config(base.config, charset))
    if run.head_init == "embedding":
        embedding = base.get_output_embeddings().weight
        with deepspeed.zero.GatheredParameters([embedding]):
            init_heads(model.char_heads, embedding.detach().cpu(), table, token_counts.cpu())
    if run.whiten_readout:
        model.char_heads.add_whitening()  # identity until the run fits it (Distillation._fit_whitening)
    trainable = model.freeze_for_distillation()
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    if trunk_layer is not None:
        model.drop_layers_below(trunk_layer)
        model.drop_token_embeddings(keep_lm_head=run.needs_token_logits)
    if run.activation_checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=parameter_groups(model, run))
    if torch.distributed.get_rank() == 0:
        print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})", flush=True)
    return engine
