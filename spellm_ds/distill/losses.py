"""Distillation losses, all in fp32 whatever the model's dtype.

Label selection (the paper's anti-blending rule): of the teacher's top-5 candidates, the label is
the one whose spelling has the lowest character NLL under the current student; the default adds
``-log p_teacher`` to that score (:class:`LabelRule`). Training towards a single spelling stops
heads from mixing characters of two candidates ("Dizza" from "Donuts" and "Pizza"). The choice
is made without gradient; unspellable candidates are skipped and a position with no spellable
candidate is masked out.

A string ends at its first END: with ``ignore_after_end`` the characters after it are left out of
the label score and the char loss (decoding always ignores them, see
:func:`spellm_ds.model.spelling.read_string`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from spellm_ds.hf.char_decoding import after_first_end

if TYPE_CHECKING:
    from spellm_ds.distill.teacher import TeacherSignal
    from spellm_ds.hf.char_decoding import CharDecoder
    from spellm_ds.model.spelling import SpellingTable

TOP_K = 5
"""The teacher's candidates per position: the labels are chosen among them, match@5 counts them."""
MAX_SOFT_CHAR_CANDIDATES = 1024
"""The widest top-M the soft targets read (``--soft_char_candidates``): on SmolLM2-135M's held-out
BoolQ text it holds 97.5% of the teacher's probability on average (its top-5: 67%), and the
targets' transient tensors grow with M."""
LABEL_RULES = ("joint", "student_nll", "teacher_top1")
"""``joint``: lowest char NLL - prior_weight x log p_teacher (the default); ``student_nll``: lowest
char NLL (the paper's); ``teacher_top1``: the teacher's first spellable candidate."""
REG_TARGETS = ("label", "teacher")
"""What the token regulariser pulls the student's LM-head distribution towards: ``label``, cross-
entropy with the selected label; ``teacher``, KL from the teacher's top-5 probabilities plus the
mass of all other tokens as one bucket (no full-vocabulary teacher logits needed)."""


@dataclass(frozen=True)
class LabelRule:
    name: str = "joint"
    prior_weight: float = 1.0  # the weight of -log p_teacher in the joint score
    ignore_after_end: bool = False
    per_char: bool = False
    """The char NLL in the score divided by the characters it counts: a long candidate is not
    out-scored by a short one for its length alone (beyond the paper)."""
    gate: float | None = None
    """Where the teacher gives its top-1 at least this probability (and it is spellable), the label
    is its top-1 whatever the rule scores: a confident teacher leaves nothing to blend (beyond the
    paper; None: never)."""


def label_rule_of(settings) -> LabelRule:
    """The label rule a run config or a model's ``SpeLLMConfig`` names (their ``label_*`` fields)."""
    return LabelRule(name=settings.label_selection, prior_weight=settings.label_prior_weight,
                     ignore_after_end=settings.ignore_after_end, per_char=settings.label_per_char,
                     gate=settings.label_gate)


@dataclass(frozen=True)
class LossRecipe:
    """The loss's knobs. The field defaults are the plain recipe the unit tests build on; a run's
    defaults are :class:`spellm_ds.distill.config.RunConfig`'s."""

    reg_weight: float = 0.1
    reg_target: str = "label"
    soft_char_weight: float = 0.0  # auxiliary per-head CE with the characters of the teacher's candidates
    ignore_after_end: bool = False
    soft_char_prefix: bool = False  # head i's soft targets only from candidates sharing the label's first i chars
    spelling_kl_weight: float = 0.0  # KL from the teacher's top-5 to the char heads' token distribution
    spelling_kl_fraction: float = 1.0  # the share of positions that KL is computed on (a uniform sample)


class Labels(NamedTuple):
    token_ids: torch.Tensor  # [B, T] selected teacher candidate (a token id)
    chars: torch.Tensor  # [B, T, k] its spelling
    valid: torch.Tensor  # [B, T] bool: some candidate was spellable


class LossParts(NamedTuple):
    total: torch.Tensor
    char: torch.Tensor
    token: torch.Tensor
    soft_char: torch.Tensor
    spelling_kl: torch.Tensor


def candidate_char_nll(char_logp: torch.Tensor, candidate_chars: torch.Tensor) -> torch.Tensor:
    """Per-character NLL of each candidate spelling: ``[B,T,k,C]`` log-probs, ``[B,T,n,k]`` -> ``[B,T,n,k]``."""
    n = candidate_chars.shape[2]
    expanded = char_logp.unsqueeze(2).expand(-1, -1, n, -1, -1)
    return -expanded.gather(-1, candidate_chars.unsqueeze(-1)).squeeze(-1)


def scored_chars(chars: torch.Tensor, ignore_after_end: bool) -> torch.Tensor:
    """``[..., k]`` float mask of the characters a loss or score counts."""
    return (~after_first_end(chars) if ignore_after_end else torch.ones_like(chars, dtype=torch.bool)).float()


def candidate_nll(char_logp: torch.Tensor, candidate_chars: torch.Tensor, ignore_after_end: bool = False,
                  per_char: bool = False) -> torch.Tensor:
    """Char NLL of each candidate spelling: ``[B,T,k,C]`` log-probs, ``[B,T,n,k]`` -> ``[B,T,n]``;
    with ``per_char``, divided by the number of characters counted."""
    per_position = candidate_char_nll(char_logp, candidate_chars)
    counted = scored_chars(candidate_chars, ignore_after_end)
    nll = (per_position * counted).sum(-1)
    return nll / counted.sum(-1) if per_char else nll


@torch.no_grad()
def select_labels(char_logits: torch.Tensor, top_ids: torch.Tensor, spelling_chars: torch.Tensor,
                  spellable: torch.Tensor, teacher_probs: torch.Tensor | None = None, prior_weight: float = 1.0,
                  ignore_after_end: bool = False, per_char: bool = False) -> Labels:
    """The min-NLL spellable candidate per position (``spelling_chars``/``spellable`` index by token id).

    With ``teacher_probs`` (``[B, T, n]``) the score is the joint ``char NLL - prior_weight x log p_teacher``:
    the candidate the student spells best *and* the teacher finds likely (``--label_selection joint``).
    ``per_char``: the NLL per counted character (:class:`LabelRule`).
    """
    candidate_chars = spelling_chars[top_ids]  # [B, T, n, k]
    nll = candidate_nll(torch.log_softmax(char_logits.float(), -1), candidate_chars, ignore_after_end, per_char)
    if teacher_probs is not None:
        nll = nll - prior_weight * torch.log(teacher_probs.float().clamp(min=1e-30))
    return _pick(nll, top_ids, candidate_chars, spellable)


def _pick(score: torch.Tensor, top_ids: torch.Tensor, candidate_chars: torch.Tensor, spellable: torch.Tensor) -> Labels:
    """The spellable candidate with the lowest ``score`` ``[B, T, n]``."""
    score = score.masked_fill(~spellable[top_ids], float("inf"))
    best = score.argmin(-1, keepdim=True)
    token_ids = top_ids.gather(-1, best).squeeze(-1)
    chars = candidate_chars.gather(2, best.unsqueeze(-1).expand(-1, -1, -1, candidate_chars.shape[-1])).squeeze(2)
    return Labels(token_ids, chars, spellable[top_ids].any(-1))


def choose_labels(rule: LabelRule, char_logits: torch.Tensor, signal: TeacherSignal, table: SpellingTable) -> Labels:
    """The labels under ``rule`` (the rule a model was trained with is recorded in its ``spellm_config.json``)."""
    if rule.name == "teacher_top1":
        rank = torch.arange(signal.top_ids.shape[-1], device=signal.top_ids.device, dtype=torch.float32)
        return _pick(rank.expand(signal.top_ids.shape), signal.top_ids, table.chars[signal.top_ids], table.spellable)
    prior = signal.top_probs if rule.name == "joint" else None
    labels = select_labels(char_logits, signal.top_ids, table.chars, table.spellable, prior, rule.prior_weight,
                           rule.ignore_after_end, rule.per_char)
    if rule.gate is None:
        return labels
    top1 = signal.top_ids[..., 0]
    confident = (signal.top_probs[..., 0].float() >= rule.gate) & table.spellable[top1]
    return Labels(torch.where(confident, top1, labels.token_ids),
                  torch.where(confident.unsqueeze(-1), table.chars[top1], labels.chars), labels.valid)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the masked values over ``count``: the mask's own count unless given (the mean count
    over the ranks, which makes the ranks' averaged gradient the global batch's mean)."""
    count = mask.sum() if count is None else count
    return (values * mask).sum() / count.clamp(min=1e-6)


def token_regulariser(token_logits: torch.Tensor, labels: Labels, signal: TeacherSignal, target: str,
                      valid_count: torch.Tensor | None = None) -> torch.Tensor:
    """The student's LM-head distribution against the selected label (CE) or the teacher (top-5 + rest KL)."""
    logq = torch.log_softmax(token_logits.float(), -1)  # [B, T, V]
    if target == "label":
        mask = labels.valid.float()
        return masked_mean(-logq.gather(-1, labels.token_ids.unsqueeze(-1)).squeeze(-1), mask, valid_count)
    p = signal.top_probs.float()
    logq_top = logq.gather(-1, signal.top_ids)
    p_rest = (1 - p.sum(-1)).clamp(min=1e-6)
    q_rest = (1 - logq_top.exp().sum(-1)).clamp(min=1e-6)
    kl = (p * (p.clamp(min=1e-30).log() - logq_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.mean()


def candidate_weights(top_ids: torch.Tensor, top_probs: torch.Tensor, table: SpellingTable) -> torch.Tensor:
    """The teacher's candidate probabilities renormalised over the spellable candidates ``[B, T, n]``."""
    weights = top_probs.float() * table.spellable[top_ids]
    return weights / weights.sum(-1, keepdim=True).clamp(min=1e-30)


def soft_char_targets(top_ids: torch.Tensor, top_probs: torch.Tensor, table: SpellingTable, ignore_after_end: bool,
                      num_chars: int, label_chars: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head character targets ``[B, T, k, C]`` from the teacher's candidates ``[B, T, n]``: each
    candidate's renormalised probability, spread evenly over its counted characters. Each position's
    targets sum to 1 over heads and characters, so the soft loss ``-sum(targets x char log-probs)``
    is the probability-weighted mean of the candidates' per-character NLL.

    With ``label_chars`` ``[B, T, k]`` (``--soft_char_prefix``) head i's targets come only from the
    candidates that spell the label's first i characters, renormalised per head, and each head that
    has any weighs 1 / their number: the heads' marginals then follow the label's path, where the
    plain targets pull head i towards characters of candidates that left it earlier (`' to'` and
    `','` make head 1 `t` or END: the blend `' '`). Off by default: in a pilot it cost 2.1 raw top-1
    points and left the blends as many (``experiments/fidelity-pilots.md``)."""
    chars = table.chars[top_ids]  # [B, T, n, k]
    keep = scored_chars(chars, ignore_after_end)
    weights = candidate_weights(top_ids, top_probs, table).unsqueeze(-1)
    if label_chars is None:
        per_char = weights * keep / keep.sum(-1, keepdim=True)
    else:
        same = (chars == label_chars.unsqueeze(2)).float()
        on_path = torch.cat([torch.ones_like(same[..., :1]), same[..., :-1].cumprod(-1)], -1)
        per_head = weights * keep * on_path  # [B, T, n, k]
        head_total = per_head.sum(2, keepdim=True)
        heads = (head_total > 0).sum(-1, keepdim=True).clamp(min=1)
        per_char = per_head / head_total.clamp(min=1e-30) / heads
    targets = per_char.new_zeros(*chars.shape[:2], chars.shape[-1], num_chars)
    return targets.scatter_add_(-1, chars.transpose(2, 3), per_char.transpose(2, 3))


def soft_char_loss(char_logp: torch.Tensor, signal: TeacherSignal, table: SpellingTable, ignore_after_end: bool,
                   valid: torch.Tensor, valid_count: torch.Tensor | None = None,
                   label_chars: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head CE with the characters of the teacher's candidates (its top-M when the signal holds
    them, else its top-5), each candidate weighted by its renormalised teacher probability: the
    heads see the teacher's uncertainty, not one label (``label_chars``: see :func:`soft_char_targets`)."""
    ids, probs = ((signal.top_ids, signal.top_probs) if signal.wide_ids is None
                  else (signal.wide_ids, signal.wide_probs))
    targets = soft_char_targets(ids, probs, table, ignore_after_end, char_logp.shape[-1], label_chars)
    return masked_mean(-(targets * char_logp).sum((-2, -1)), valid.float(), valid_count)


def spelling_kl_loss(char_logp: torch.Tensor, signal: TeacherSignal, decoder: CharDecoder, valid: torch.Tensor,
                     valid_count: torch.Tensor | None = None, fraction: float = 1.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """KL from the teacher's top-5 (renormalised over the spellable ones) to the char heads' token
    distribution, the one likelihood scoring reads (:meth:`CharDecoder.spelling_log_probs`: summed
    log-probs up to the first END, normalised over every valid spelling). Unlike the per-head
    losses it sees the normaliser, so it is the loss that calibrates the probability the heads give
    tokens other than their argmax.

    Scoring every valid spelling is the cost, so with ``fraction`` < 1 the KL is computed on a
    uniform sample of that share of the positions (drawn with ``generator``) and scaled by
    positions / sample size: the loss and its gradient keep their expectation, at the sample's cost.
    """
    valid_count = valid.float().sum() if valid_count is None else valid_count
    scale = 1.0
    if fraction < 1:
        positions = valid.numel()
        size = max(1, round(fraction * positions))
        picked = torch.randperm(positions, generator=generator)[:size].to(valid.device)

        def sampled(values: torch.Tensor) -> torch.Tensor:  # [B, T, ...] -> [1, size, ...]
            return values.flatten(0, 1)[picked].unsqueeze(0)

        char_logp, valid = sampled(char_logp), sampled(valid)
        signal = type(signal)(*(None if field is None else sampled(field) for field in signal))
        scale = positions / size
    batch, length, k, charset_size = char_logp.shape
    scores = decoder.spelling_scores(char_logp.reshape(batch * length, k, charset_size))
    normaliser = torch.logsumexp(scores, -1).view(batch, length, 1)
    log_q = -candidate_nll(char_logp, decoder.table.chars[signal.top_ids], ignore_after_end=True) - normaliser
    weights = candidate_weights(signal.top_ids, signal.top_probs, decoder.table)
    kl = (weights * (weights.clamp(min=1e-30).log() - log_q)).sum(-1)
    return scale * masked_mean(kl, valid.float(), valid_count)


def rare_label_weights(token_counts: torch.Tensor, power: float) -> torch.Tensor:
    """``[V]`` weights of a position's char loss by its label token: ``(count + 1) ** -power``.

    The heads spell rarely seen tokens far worse (:mod:`analysis.label_frequency`);
    ``--rare_label_power`` (beyond the paper) moves gradient from the spellings they see often to
    those they see rarely, the char loss staying a weighted mean. In pilots it cost raw agreement
    and barely helped the rare tokens (``experiments/fidelity-pilots.md``, "Rare labels weighted up"), so
    it is off by default."""
    return (token_counts.double() + 1).pow(-power).float()


def distillation_loss(char_logits: torch.Tensor, token_logits: torch.Tensor | None, labels: Labels,
                      signal: TeacherSignal, table: SpellingTable, recipe: LossRecipe,
                      mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] = lambda counts: counts,
                      decoder: CharDecoder | None = None, generator: torch.Generator | None = None,
                      label_weights: torch.Tensor | None = None) -> LossParts:
    """Char CE over the valid positions' counted characters (all k, or up to the label's first END;
    with ``label_weights`` ``[V]``, a mean weighted by each position's label token, see
    :func:`rare_label_weights`), plus ``reg_weight`` x the token regulariser through the frozen LM
    head, plus ``soft_char_weight`` x the soft per-head loss, plus ``spelling_kl_weight`` x the KL to
    the heads' token distribution (which needs ``decoder``, built once per run from ``table``: it
    holds the valid spellings; with ``spelling_kl_fraction`` < 1, ``generator`` draws its sample of
    positions).

    Each mean divides by ``mean_over_ranks`` of this rank's count (of counted characters, of valid
    positions): their number varies per rank, and DeepSpeed averages the ranks' gradients, so a
    per-rank mean would weight a character by 1 / its rank's count; this way N ranks give the
    gradient of one rank holding the whole batch. Identity (the default) on one process."""
    char_logp = torch.log_softmax(char_logits.float(), -1)
    char_ce = -char_logp.gather(-1, labels.chars.unsqueeze(-1)).squeeze(-1)  # [B, T, k]
    valid = labels.valid.float()
    counted = scored_chars(labels.chars, recipe.ignore_after_end) * valid.unsqueeze(-1)
    if label_weights is not None:
        counted = counted * label_weights[labels.token_ids].unsqueeze(-1)
    counted_count, valid_count = mean_over_ranks(torch.stack([counted.sum(), valid.sum()]).detach()).unbind()
    char_loss = masked_mean(char_ce, counted, counted_count)
    zero = torch.zeros((), device=char_logits.device)
    token_loss = (token_regulariser(token_logits, labels, signal, recipe.reg_target, valid_count)
                  if token_logits is not None and recipe.reg_weight > 0 else zero)
    soft = (soft_char_loss(char_logp, signal, table, recipe.ignore_after_end, labels.valid, valid_count,
                           labels.chars if recipe.soft_char_prefix else None)
            if recipe.soft_char_weight > 0 else zero)
    if recipe.spelling_kl_weight > 0 and decoder is None:
        raise ValueError("spelling_kl_weight > 0 needs the run's CharDecoder (decoder=)")
    spelling_kl = (spelling_kl_loss(char_logp, signal, decoder, labels.valid, valid_count,
                                    recipe.spelling_kl_fraction, generator)
                   if recipe.spelling_kl_weight > 0 else zero)
    total = (char_loss + recipe.reg_weight * token_loss + recipe.soft_char_weight * soft
             + recipe.spelling_kl_weight * spelling_kl)
    return LossParts(total, char_loss, token_loss, soft, spelling_kl)
