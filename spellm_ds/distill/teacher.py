"""The teacher's signal: top-k next tokens, their probabilities and the entropy, per position.

The LM head is applied in chunks of positions, so only a ``[B * chunk, V]`` slice of logits
exists at any time (the full ``[B, T, V]`` tensor is 200 MB for SmolLM2 at 4 x 256 in fp32).
Everything after the LM head is fp32.

Two costs this avoids, both measured on SmolLM2: a strided 3-D slice ``hidden[:, a:b]`` makes
``matmul`` copy the whole ``[V, d]`` weight once per batch row (1.0 of 1.5 s per 1,024 positions
on a 2-core CPU); and calling the ZeRO-3-hooked ``lm_head`` module per chunk re-gathers its
weight every chunk. So the hidden state is flattened to contiguous rows, and the weight is
gathered once and applied with ``F.linear``, which no DeepSpeed hook sees.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class TeacherSignal(NamedTuple):
    top_ids: torch.Tensor  # [B, T, top_k] int64
    top_probs: torch.Tensor  # [B, T, top_k] fp32
    entropy: torch.Tensor  # [B, T] fp32, in nats
    target_logp: torch.Tensor | None = None  # [B, T] fp32 log-prob of given targets (analysis only)
    wide_ids: torch.Tensor | None = None  # [B, T, M] the top-M (M > top_k) for the soft targets (training only)
    wide_probs: torch.Tensor | None = None  # [B, T, M] fp32


def lm_head_log_probs(lm_head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's next-token log-probabilities, in fp32 whatever the model's dtype (its weights
    used directly: under ZeRO-3 the caller gathers them)."""
    return torch.log_softmax(F.linear(hidden, lm_head.weight, lm_head.bias).float(), dim=-1)


def gathered_if_partitioned(params: list[nn.Parameter]) -> AbstractContextManager:
    """Gather ZeRO-3 parameters for a block, unless they are whole already (persistent ones, a
    teacher without hooks, or no DeepSpeed at all, as in analysis): leaving the block would free
    them. Their status is the same on every rank, so every rank takes the same collectives."""
    if not any(hasattr(p, "ds_status") for p in params):
        return nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    partitioned = any(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in params)
    return deepspeed.zero.GatheredParameters(params, enabled=partitioned)


@torch.no_grad()
def top_tokens_from_hidden(hidden: torch.Tensor, lm_head: nn.Module, top_k: int = 5, chunk: int = 64,
                           targets: torch.Tensor | None = None, wide_k: int | None = None) -> TeacherSignal:
    """Top-k of ``lm_head(hidden)`` ``[B, T, d]``, ``chunk`` positions per sequence at a time; with
    ``targets`` (``[B, T]`` token ids) also their log-probs; with ``wide_k`` > ``top_k`` also the
    top-``wide_k`` (a sort of its own, so the top-k are the same with or without it)."""
    batch, length, _ = hidden.shape
    rows = hidden.reshape(batch * length, -1)
    target_rows = None if targets is None else targets.reshape(batch * length, 1)
    step = batch * chunk
    wide = wide_k is not None and wide_k > top_k
    ids, logps, entropies, target_logps, wide_ids, wide_logps = [], [], [], [], [], []
    with gathered_if_partitioned(list(lm_head.parameters())):
        for start in range(0, len(rows), step):
            logp = lm_head_log_probs(lm_head, rows[start : start + step])
            entropies.append(-(logp.exp() * logp).sum(-1))
            top_logp, top_ids = logp.topk(top_k, dim=-1)
            ids.append(top_ids)
            logps.append(top_logp)
            if wide:
                top_logp, top_ids = logp.topk(wide_k, dim=-1)
                wide_ids.append(top_ids)
                wide_logps.append(top_logp)
            if target_rows is not None:
                target_logps.append(logp.gather(-1, target_rows[start : start + step]).squeeze(-1))

    def joined(parts: list[torch.Tensor]) -> torch.Tensor | None:  # chunks -> [B, T, ...]
        return torch.cat(parts).view(batch, length, *parts[0].shape[1:]) if parts else None

    return TeacherSignal(joined(ids), joined(logps).exp(), joined(entropies), joined(target_logps),
                         joined(wide_ids), joined(wide_logps).exp() if wide else None)


@torch.no_grad()
def noised_states(hidden: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``hidden`` ``[B, T, d]`` plus Gaussian noise of ``sigma`` times each position's RMS over ``d``
    (in fp32; returned in ``hidden``'s dtype). ``--state_noise`` trains on such states near the
    ones real text gave, which the teacher's LM head labels exactly at a fraction of a new block's
    cost (the head alone, not the decoder). ``generator`` is a CPU one, so the draw is the same on
    any device."""
    noise = torch.randn(hidden.shape, generator=generator).to(hidden.device)
    states = hidden.float()
    return (states + sigma * states.pow(2).mean(-1, keepdim=True).sqrt() * noise).to(hidden.dtype)


# How far an anchored state moves, in units of its norm: on SmolLM2-135M's final states the anchor
# token is the LM head's top-1 at 42% of them at 0.2 and at 91% at 0.3, so between 0.2 and 0.4 it
# mostly wins against the context's own candidates, which stay in its top-5 as a real next token's do.
ANCHOR_SHIFT = (0.2, 0.4)


class StateAnchors:
    """New training states for the tokens the text names: a real state moved towards one token.

    The direction for token t is row t of ``E (E^T E)^-1`` (``E`` the LM head's ``[V, d]`` weight):
    of all directions it raises t's logit most for a given change of the others (least squares), so
    the moved state's top candidates are t and the context's own. A plain ``E_t`` would not do: the
    embeddings share a common direction, and a state moved along one made t the top-1 at only 12%
    of SmolLM2's states. The LM head labels the moved state exactly, for its cost alone (the
    decoder does not run), as with ``--state_noise``; here the new states cover every token of
    ``tokens`` alike, where the text gives a rare token few contexts. Off by default: it helped a
    read-out probe and cost raw agreement in the pipeline's pilots (``experiments/fidelity-pilots.md``).
    """

    @torch.no_grad()
    def __init__(self, lm_head: nn.Module, tokens: torch.Tensor) -> None:
        with gathered_if_partitioned(list(lm_head.parameters())):
            weight = lm_head.weight.double()
            self.inverse_gram = torch.linalg.inv(weight.T @ weight).float()  # [d, d]
        self.lm_head = lm_head
        self.tokens = tokens.cpu()  # [n] the token ids anchors are drawn from, uniformly

    @torch.no_grad()
    def states(self, hidden: torch.Tensor, rows: int, generator: torch.Generator) -> torch.Tensor:
        """``rows`` x T new states from ``hidden`` ``[B, T, d]``: each a random position's state moved
        towards a random token of ``tokens`` by ``ANCHOR_SHIFT`` times its norm (in fp32; returned in
        ``hidden``'s dtype). ``generator`` is a CPU one, so the draw is the same on any device."""
        length, width = hidden.shape[1], hidden.shape[2]
        count = rows * length
        sources = torch.randint(hidden.shape[0] * length, (count,), generator=generator)
        anchors = self.tokens[torch.randint(len(self.tokens), (count,), generator=generator)]
        low, high = ANCHOR_SHIFT
        shift = (low + (high - low) * torch.rand(count, 1, generator=generator)).to(hidden.device)
        with gathered_if_partitioned(list(self.lm_head.parameters())):
            directions = self.lm_head.weight[anchors.to(hidden.device)].float() @ self.inverse_gram.to(hidden.device)
        directions = directions / directions.norm(dim=-1, keepdim=True)
        states = hidden.reshape(-1, width)[sources.to(hidden.device)].float()
        moved = states + shift * states.norm(dim=-1, keepdim=True) * directions
        return moved.view(rows, length, width).to(hidden.dtype)


def joined_signals(first: TeacherSignal, second: TeacherSignal) -> TeacherSignal:
    """Two signals' rows, ``first``'s then ``second``'s (a field one of them lacks is dropped)."""
    return TeacherSignal(*(None if a is None or b is None else torch.cat([a, b]) for a, b in zip(first, second)))


@torch.no_grad()
def teacher_signal(teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   top_k: int = 5, chunk: int = 64, trunk_layer: int | None = None,
                   targets: torch.Tensor | None = None,
                   wide_k: int | None = None,
                   with_signal: bool = True) -> tuple[TeacherSignal | None, torch.Tensor | None]:
    """Run the frozen causal LM's decoder, then its LM head in chunks (``targets``, ``wide_k``: see
    :func:`top_tokens_from_hidden`; ``with_signal=False``: the decoder alone, signal ``None``).

    With ``trunk_layer`` it also returns the hidden state entering that layer (the shared trunk
    a student whose layers below it are frozen copies can start from); at the number of layers,
    the final normed hidden state (a student with no trainable layers).
    """
    whole_decoder = trunk_layer == teacher.config.get_text_config().num_hidden_layers
    out = teacher.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                output_hidden_states=trunk_layer is not None and not whole_decoder)
    signal = top_tokens_from_hidden(out.last_hidden_state, teacher.get_output_embeddings(), top_k, chunk, targets,
                                    wide_k) if with_signal else None
    if trunk_layer is None:
        return signal, None
    return signal, out.last_hidden_state if whole_decoder else out.hidden_states[trunk_layer]
