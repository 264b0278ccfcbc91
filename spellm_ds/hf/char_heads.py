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

Torch only: this file is copied into every exported model (``trust_remote_code``).
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_INITS = ("embedding", "random")


class CharHeads(nn.Module):
    def __init__(self, hidden_size: int, k: int, num_chars: int, readout_width: int = 0,
                 wide_heads: bool = False) -> None:
        super().__init__()
        self.k, self.num_chars, self.wide_heads = k, num_chars, wide_heads
        self.readout = None
        if readout_width > 0:
            out = k * num_chars if wide_heads else hidden_size
            self.readout = nn.Sequential(nn.Linear(hidden_size, readout_width), nn.GELU(),
                                         nn.Linear(readout_width, out))
            nn.init.zeros_(self.readout[2].weight)
            nn.init.zeros_(self.readout[2].bias)
        self.proj = nn.Linear(hidden_size, k * num_chars)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` -> char logits ``[..., k, |C|]``."""
        if self.readout is None:
            logits = self.proj(hidden)
        elif self.wide_heads:
            logits = self.proj(hidden) + self.readout(hidden)
        else:
            logits = self.proj(hidden + self.readout(hidden))
        return logits.unflatten(-1, (self.k, self.num_chars))

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
