"""The teacher's signal: top-k next tokens, their probabilities and the entropy, per position.

The LM head is applied in chunks along the sequence, so only a ``[B, chunk, V]`` slice of logits
exists at any time (the full ``[B, T, V]`` tensor is 200 MB for SmolLM2 at 4 x 256 in fp32).
Everything after the LM head is fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import deepspeed
import torch
from torch import nn


class TeacherSignal(NamedTuple):
    top_ids: torch.Tensor  # [B, T, top_k] int64
    top_probs: torch.Tensor  # [B, T, top_k] fp32
    entropy: torch.Tensor  # [B, T] fp32, in nats


def lm_head_log_probs(lm_head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's next-token log-probabilities, in fp32 whatever the model's dtype."""
    return torch.log_softmax(lm_head(hidden).float(), dim=-1)


@torch.no_grad()
def top_tokens_from_hidden(hidden: torch.Tensor, lm_head: nn.Module, top_k: int = 5,
                           chunk: int = 64) -> TeacherSignal:
    """Top-k of ``lm_head(hidden)`` along the sequence in chunks (weights gathered once under ZeRO-3)."""
    ids, probs, entropies = [], [], []
    with deepspeed.zero.GatheredParameters(list(lm_head.parameters())):
        for start in range(0, hidden.shape[1], chunk):
            logp = lm_head_log_probs(lm_head, hidden[:, start : start + chunk])
            entropies.append(-(logp.exp() * logp).sum(-1))
            top_logp, top_ids = logp.topk(top_k, dim=-1)
            ids.append(top_ids)
            probs.append(top_logp.exp())
    return TeacherSignal(torch.cat(ids, 1), torch.cat(probs, 1), torch.cat(entropies, 1))


@torch.no_grad()
def teacher_signal(teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   top_k: int = 5, chunk: int = 64,
                   trunk_layer: int | None = None) -> tuple[TeacherSignal, torch.Tensor | None]:
    """Run the frozen causal LM's decoder, then its LM head in chunks.

    With ``trunk_layer`` it also returns the hidden state entering that layer (the shared trunk
    a student whose layers below it are frozen copies can start from).
    """
    out = teacher.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                output_hidden_states=trunk_layer is not None)
    signal = top_tokens_from_hidden(out.last_hidden_state, teacher.get_output_embeddings(), top_k, chunk)
    return signal, (out.hidden_states[trunk_layer] if trunk_layer is not None else None)
