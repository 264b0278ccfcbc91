"""The k character heads, computed as one fused ``Linear(d, k * |C|)``, optionally behind a
residual MLP read-out.

One GEMM with k*|C| outputs is exactly k separate ``Linear(d, |C|)`` heads side by side (the
output is reshaped to ``[..., k, |C|]``), and much cheaper to launch than k small ones.

The read-out (``readout_width`` > 0, beyond the paper) is one residual block
``h + W2 gelu(W1 h)`` shared by the heads. It lets the heads spell well from a hidden state the
student does not change (``trainable_layers`` 0: the fallback path is then exactly the teacher);
its output layer starts at zero, so an untrained read-out is the identity. With ``wide_heads``
(beyond the paper) the read-out's output layer maps its hidden layer straight to the k*|C| char
logits, added to the heads' own: the logits then reach rank k*|C| in the read-out's features,
where through the d-wide residual they reach rank d at most.

With ``prototypes`` P > 0 (beyond the paper) each head scores a character by the max of P
prototype rows: the character at position j is a union of many tokens' regions of the state
space, which one half-space per character cannot carve out. Started from the LM-head rows of the
P most frequent tokens spelled with that character there (:meth:`CharHeads.init_prototypes`), the
untrained heads already spell the teacher's top-1 wherever it is one of the prototypes; empty
slots (fewer than P such tokens) are masked. Only the filled rows are computed (47% of them at
P = 16 on SmolLM2; their weights are gathered at each call, which at batch 1 costs more than the
product saves), and the max is taken without autograd and read back with one gather, so the
backward pass touches only the winning rows: a training step's heads cost half as much as with
every row and a differentiable max.

With whitening (:meth:`CharHeads.add_whitening`, training only, beyond the paper) the read-out
reads its input centred and whitened; at export the whitening folds into the read-out's first
layer (:func:`fold_whitening`), so exported models never carry it.

Torch only: this file is copied into every exported model (``trust_remote_code``).
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_INITS = ("embedding", "random")
EMPTY_SLOT = -1e4
"""The logit of a masked prototype slot: below any real one, finite so that 0 x log p stays 0."""


class PartialLinear(nn.Linear):
    """``nn.Linear`` that can compute only some of its outputs (``rows``). It is called as a module,
    so ZeRO-3's hooks gather its weights for it, as for any layer."""

    def forward(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is None:
            return super().forward(hidden)
        return nn.functional.linear(hidden, self.weight.index_select(0, rows), self.bias.index_select(0, rows))


class CharHeads(nn.Module):
    def __init__(self, hidden_size: int, k: int, num_chars: int, readout_width: int = 0,
                 wide_heads: bool = False, prototypes: int = 0) -> None:
        super().__init__()
        self.k, self.num_chars, self.wide_heads, self.prototypes = k, num_chars, wide_heads, prototypes
        self.readout = None
        if readout_width > 0:
            out = k * num_chars if wide_heads else hidden_size
            self.readout = nn.Sequential(nn.Linear(hidden_size, readout_width), nn.GELU(),
                                         nn.Linear(readout_width, out))
            nn.init.zeros_(self.readout[2].weight)
            nn.init.zeros_(self.readout[2].bias)
        self.proj = PartialLinear(hidden_size, k * num_chars * max(prototypes, 1))
        if prototypes:
            self.register_buffer("empty_slots", torch.zeros(k * num_chars * prototypes, dtype=torch.bool))
            self._slot_layout: tuple | None = None
        self.whitened = False

    def add_whitening(self) -> None:
        """The read-out reads ``A (h - m)`` instead of ``h`` (``whiten_matrix`` A, ``whiten_mean`` m;
        identity until :meth:`fit_whitening`). Why: the teacher's final states share one large common
        direction and spread over four orders of magnitude of variance, which the read-out's
        per-coordinate Adam steps handle badly. Buffers, so checkpoints carry them."""
        if self.readout is None:
            raise ValueError("whitening is the read-out's input: it needs a read-out")
        d = self.proj.in_features
        self.register_buffer("whiten_mean", torch.zeros(d))
        self.register_buffer("whiten_matrix", torch.eye(d))
        self.whitened = True

    @torch.no_grad()
    def fit_whitening(self, mean: torch.Tensor, covariance: torch.Tensor, shrinkage: float = 0.1) -> torch.Tensor:
        """ZCA whitening of states with this ``mean`` and ``covariance``, shrunk towards its mean
        variance by ``shrinkage`` (directions a small sample barely sees are not blown up);
        returns the covariance's eigenvalues."""
        values, vectors = torch.linalg.eigh(covariance.double())
        shrunk = (1 - shrinkage) * values + shrinkage * values.mean()  # the same eigenvectors
        self.whiten_matrix.copy_(vectors @ torch.diag(shrunk.rsqrt()) @ vectors.T)
        self.whiten_mean.copy_(mean)
        return values

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` -> char logits ``[..., k, |C|]``."""
        if self.readout is not None and self.wide_heads:
            return (self.proj(hidden) + self._readout(hidden)).unflatten(-1, (self.k, self.num_chars))
        features = hidden if self.readout is None else hidden + self._readout(hidden)
        if self.prototypes:
            return self.prototype_logits(features)
        return self.proj(features).unflatten(-1, (self.k, self.num_chars))

    def _readout(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.whitened:
            hidden = nn.functional.linear(hidden - self.whiten_mean, self.whiten_matrix)
        return self.readout(hidden)

    def prototype_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Each (position, char)'s best filled prototype: ``[..., d]`` -> ``[..., k, |C|]``;
        ``EMPTY_SLOT`` where a (position, char) has none."""
        rows, columns = self.slot_layout()
        compact = nn.functional.pad(self.proj(features, rows), (0, 1), value=EMPTY_SLOT)  # an empty slot's column
        compact = compact.flatten(0, -2)  # [M, filled + 1]
        per_char = columns.view(self.k * self.num_chars, self.prototypes)
        with torch.no_grad():
            best = compact.index_select(1, columns).unflatten(1, (-1, self.prototypes)).argmax(-1)  # [M, k |C|]
            chosen = per_char.gather(1, best.t()).t()
        return compact.gather(1, chosen).view(*features.shape[:-1], self.k, self.num_chars)

    def slot_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, columns)``: the filled slots' rows of ``proj``, and each slot's column among
        them (the extra last column, ``EMPTY_SLOT``, for an empty one); rebuilt when the mask changes."""
        mask = self.empty_slots
        if self._slot_layout is None or self._slot_layout[0] is not mask or self._slot_layout[1] != mask._version:
            filled = ~mask
            rows = filled.nonzero().squeeze(1)
            self._slot_layout = (mask, mask._version, rows, torch.where(filled, filled.long().cumsum(0) - 1, len(rows)))
        return self._slot_layout[2:]

    @torch.no_grad()
    def init_from_embeddings(self, embeddings: torch.Tensor, chars: torch.Tensor, spellable: torch.Tensor) -> None:
        """Informed start: head j's row for char c is the mean output embedding of the tokens
        spelled with c at position j, and its bias the log frequency of c there.

        With a tied or untied LM head, ``h . E_v`` is the teacher's logit for token v, so
        averaging ``E_v`` over the tokens that share a character gives a head that already
        scores that character by how likely its tokens are.
        """
        k, num_chars = self.k, self.num_chars
        emb = embeddings[spellable].float()  # [N, d]
        ids = chars[spellable]  # [N, k]
        weight = torch.zeros(k, num_chars, emb.shape[1])
        counts = torch.zeros(k, num_chars)
        for j in range(k):
            weight[j].index_add_(0, ids[:, j], emb)
            counts[j] += torch.bincount(ids[:, j], minlength=num_chars).float()
        weight /= counts.clamp(min=1).unsqueeze(-1)
        self.proj.weight.copy_(weight.reshape(k * num_chars, -1))
        self.proj.bias.copy_(torch.log((counts + 1) / (counts + 1).sum(-1, keepdim=True)).reshape(-1))

    @torch.no_grad()
    def init_prototypes(self, lm_head: torch.Tensor, chars: torch.Tensor, spellable: torch.Tensor,
                        counts: torch.Tensor) -> None:
        """Prototype start: the slots of (position j, char c) hold the LM-head rows of the P tokens
        spelled with c at j (END after a token's end) seen most often (``counts``; ties by id), bias
        0: the head's logit for c is then the teacher's best logit among them. Slots left over are
        masked."""
        k, num_chars, per_char = self.k, self.num_chars, self.prototypes
        rows = torch.full((k, num_chars, per_char), -1, dtype=torch.long)
        candidates = spellable.nonzero().squeeze(1)
        ordered = candidates[counts[candidates].argsort(descending=True, stable=True)]
        for j in range(k):
            column = chars[ordered, j]
            for c in column.unique().tolist():
                members = ordered[column == c][:per_char]
                rows[j, c, : len(members)] = members
        rows = rows.flatten()
        self.empty_slots.copy_(rows < 0)
        self.proj.weight.copy_(lm_head[rows.clamp(min=0)].float() * (rows >= 0).unsqueeze(1))
        self.proj.bias.zero_()


@torch.no_grad()
def fold_whitening(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whitened heads' state dict as plain heads': ``W1 A (h - m) + b1 = (W1 A) h + (b1 - W1 A m)``,
    computed in fp64; a state without whitening is returned as it is."""
    if "whiten_matrix" not in state:
        return state
    state = dict(state)
    matrix, mean = state.pop("whiten_matrix").double(), state.pop("whiten_mean").double()
    weight, bias = state["readout.0.weight"], state["readout.0.bias"]
    folded = weight.double() @ matrix
    state["readout.0.weight"] = folded.to(weight.dtype)
    state["readout.0.bias"] = (bias.double() - folded @ mean).to(bias.dtype)
    return state
