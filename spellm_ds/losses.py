"""Distillation losses, all in fp32 whatever the model's dtype.

Label selection (the paper's anti-blending rule): of the teacher's top-5 candidates, the label is
the one whose spelling has the lowest character NLL under the current student (the default adds
``-log p_teacher`` to that score, see ``select_labels``). Training towards a
single spelling stops heads from mixing characters of two candidates ("Dizza" from "Donuts" and
"Pizza"). The choice is made without gradient; unspellable candidates are skipped and a position
with no spellable candidate is masked out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from spellm_ds.spelling import SpellingTable
    from spellm_ds.teacher import TeacherSignal

LABEL_RULES = ("joint", "student_nll")
"""``joint``: lowest char NLL - log p_teacher (the default); ``student_nll``: lowest char NLL (the paper's)."""


class Labels(NamedTuple):
    token_ids: torch.Tensor  # [B, T] selected teacher candidate (a token id)
    chars: torch.Tensor  # [B, T, k] its spelling
    valid: torch.Tensor  # [B, T] bool: some candidate was spellable


class LossParts(NamedTuple):
    total: torch.Tensor
    char: torch.Tensor
    token: torch.Tensor


def candidate_nll(char_logp: torch.Tensor, candidate_chars: torch.Tensor) -> torch.Tensor:
    """Char NLL of each candidate spelling: ``[B,T,k,C]`` log-probs, ``[B,T,n,k]`` -> ``[B,T,n]``."""
    n = candidate_chars.shape[2]
    expanded = char_logp.unsqueeze(2).expand(-1, -1, n, -1, -1)
    return -expanded.gather(-1, candidate_chars.unsqueeze(-1)).squeeze(-1).sum(-1)


@torch.no_grad()
def select_labels(char_logits: torch.Tensor, top_ids: torch.Tensor, spelling_chars: torch.Tensor,
                  spellable: torch.Tensor, teacher_probs: torch.Tensor | None = None) -> Labels:
    """The min-NLL spellable candidate per position (``spelling_chars``/``spellable`` index by token id).

    With ``teacher_probs`` (``[B, T, n]``) the score is the joint ``char NLL - log p_teacher``:
    the candidate the student spells best *and* the teacher finds likely (``--label_selection joint``).
    """
    candidate_chars = spelling_chars[top_ids]  # [B, T, n, k]
    nll = candidate_nll(torch.log_softmax(char_logits.float(), -1), candidate_chars)
    if teacher_probs is not None:
        nll = nll - torch.log(teacher_probs.float().clamp(min=1e-30))
    nll = nll.masked_fill(~spellable[top_ids], float("inf"))
    best = nll.argmin(-1, keepdim=True)
    token_ids = top_ids.gather(-1, best).squeeze(-1)
    chars = candidate_chars.gather(2, best.unsqueeze(-1).expand(-1, -1, -1, candidate_chars.shape[-1])).squeeze(2)
    return Labels(token_ids, chars, spellable[top_ids].any(-1))


def choose_labels(rule: str, char_logits: torch.Tensor, signal: TeacherSignal, table: SpellingTable) -> Labels:
    """The labels under one of :data:`LABEL_RULES` (the rule a model was trained with is recorded
    in its ``spellm_config.json``)."""
    prior = signal.top_probs if rule == "joint" else None
    return select_labels(char_logits, signal.top_ids, table.chars, table.spellable, prior)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def distillation_loss(char_logits: torch.Tensor, token_logits: torch.Tensor | None, labels: Labels,
                      reg_weight: float) -> LossParts:
    """Char CE averaged over the k heads (END positions included) and valid positions, plus
    ``reg_weight`` x token CE of the frozen LM head against the selected token."""
    mask = labels.valid.float()
    char_ce = F.cross_entropy(char_logits.float().flatten(0, 2), labels.chars.flatten(), reduction="none")
    char_loss = masked_mean(char_ce.view_as(labels.chars).mean(-1), mask)
    if token_logits is None or reg_weight == 0:
        token_loss = torch.zeros((), device=char_logits.device)
    else:
        token_ce = F.cross_entropy(token_logits.float().flatten(0, 1), labels.token_ids.flatten(), reduction="none")
        token_loss = masked_mean(token_ce.view_as(mask), mask)
    return LossParts(char_loss + reg_weight * token_loss, char_loss, token_loss)
