"""Export: a ZeRO-partitioned student engine -> an HF-format SpeLLM directory.

Trainable parameters are taken from the optimizer's fp32 master weights (gathered from every
rank); frozen parameters are copied from the base model's own files, which training never
changes, so they stay bit-identical to the original (not rounded through bf16).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from safetensors.torch import load_file

from spellm_ds.errors import SpellmError
from spellm_ds.model import write_directory

BASE_PREFIX, HEADS_PREFIX = "base.", "char_heads."


def load_base_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise SpellmError(f"no .safetensors weights in {model_dir}; re-save the model with safe_serialization")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


def export_model(engine, base_dir: Path, out_dir: Path, tokenizer=None) -> Path:
    """Collective: every rank must call it; rank 0 writes ``out_dir``."""
    model = engine.module
    rank = dist.get_rank() if dist.is_initialized() else 0
    trained: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            full = safe_get_full_fp32_param(param)  # all-gather under ZeRO-3
            if rank == 0:
                trained[name] = full.detach().float().cpu().clone()
    if rank == 0:
        base_state = load_base_weights(base_dir)
        for name, tensor in trained.items():
            if name.startswith(BASE_PREFIX):
                base_state[name.removeprefix(BASE_PREFIX)] = tensor
        heads = {n.removeprefix(HEADS_PREFIX): t for n, t in trained.items() if n.startswith(HEADS_PREFIX)}
        write_directory(out_dir, model.base.config, model.config, model.charset, base_state, heads, tokenizer)
    if dist.is_initialized():
        dist.barrier()
    return out_dir
