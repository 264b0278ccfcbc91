import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from spellm_ds.losses import candidate_nll, choose_labels, distillation_loss, select_labels
from spellm_ds.teacher import TeacherSignal


def brute_force_label(char_logp, cands, spelling, spellable, prior=None):
    """The spellable candidate with the lowest char NLL (minus log p_teacher with ``prior``)."""
    best, best_score = None, float("inf")
    for i, token in enumerate(cands.tolist()):
        if not spellable[token]:
            continue
        score = -sum(char_logp[j, spelling[token, j]].item() for j in range(spelling.shape[1]))
        if prior is not None:
            score -= math.log(prior[i].item())
        if score < best_score:
            best, best_score = token, score
    return best


@pytest.mark.parametrize("rule", ["student_nll", "joint"])
def test_label_selection_matches_brute_force(rule):
    g = torch.Generator().manual_seed(0)
    V, k, C, B, T = 50, 4, 7, 3, 5
    spelling = torch.randint(0, C, (V, k), generator=g)
    spellable = torch.rand(V, generator=g) > 0.3
    spellable[:3] = False
    logits = torch.randn(B, T, k, C, generator=g)
    top = torch.randint(0, V, (B, T, 5), generator=g)
    top[0, 0] = torch.tensor([0, 1, 2, 0, 1])  # no spellable candidate: masked
    probs = torch.softmax(3 * torch.randn(B, T, 5, generator=g), -1)  # a teacher prior strong enough to matter
    signal = TeacherSignal(top, probs, torch.zeros(B, T))
    table = SimpleNamespace(chars=spelling, spellable=spellable)
    labels = choose_labels(rule, logits, signal, table)
    prior = probs if rule == "joint" else None
    unweighted = select_labels(logits, top, spelling, spellable)
    logp = torch.log_softmax(logits, -1)
    for b, t in itertools.product(range(B), range(T)):
        expected = brute_force_label(logp[b, t], top[b, t], spelling, spellable,
                                     None if prior is None else prior[b, t])
        if expected is None:
            assert not labels.valid[b, t]
        else:
            assert labels.valid[b, t] and labels.token_ids[b, t].item() == expected
            assert torch.equal(labels.chars[b, t], spelling[expected])
    assert not labels.valid[0, 0] and labels.valid.sum() >= B * T - 3
    differs = (labels.token_ids != unweighted.token_ids) & labels.valid
    assert differs.any() == (rule == "joint")  # the prior changes some labels, and only under joint


def test_candidate_nll_is_sum_of_head_nlls():
    logp = torch.log_softmax(torch.randn(1, 1, 3, 4), -1)
    cands = torch.tensor([[[[0, 1, 2], [3, 3, 3]]]])
    nll = candidate_nll(logp, cands)
    assert torch.allclose(nll[0, 0, 0], -(logp[0, 0, 0, 0] + logp[0, 0, 1, 1] + logp[0, 0, 2, 2]))
    assert torch.allclose(nll[0, 0, 1], -logp[0, 0, :, 3].sum())


def test_losses_are_fp32_under_bf16_and_match_fp32_math():
    g = torch.Generator().manual_seed(1)
    V, k, C = 30, 3, 6
    spelling = torch.randint(0, C, (V, k), generator=g)
    spellable = torch.ones(V, dtype=torch.bool)
    char_logits = torch.randn(2, 4, k, C, generator=g).bfloat16()
    token_logits = torch.randn(2, 4, V, generator=g).bfloat16()
    top = torch.randint(0, V, (2, 4, 5), generator=g)
    labels = select_labels(char_logits, top, spelling, spellable)
    parts = distillation_loss(char_logits, token_logits, labels, reg_weight=0.5)
    assert parts.total.dtype == parts.char.dtype == parts.token.dtype == torch.float32
    ref = distillation_loss(char_logits.float(), token_logits.float(), labels, reg_weight=0.5)
    assert torch.equal(parts.total, ref.total)
    manual_char = torch.nn.functional.cross_entropy(char_logits.float().reshape(-1, C), labels.chars.reshape(-1))
    assert torch.allclose(parts.char, manual_char)
    assert torch.allclose(parts.total, parts.char + 0.5 * parts.token)


def test_masked_positions_do_not_count():
    C, k = 5, 2
    spelling = torch.tensor([[1, 2], [3, 4]])
    spellable = torch.tensor([True, False])
    logits = torch.randn(1, 2, k, C)
    top = torch.tensor([[[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]])
    labels = select_labels(logits, top, spelling, spellable)
    parts = distillation_loss(logits, None, labels, reg_weight=0.0)
    only_first = torch.nn.functional.cross_entropy(logits[0, 0], spelling[0])
    assert torch.allclose(parts.char, only_first)


def test_joint_selection_adds_the_teacher_log_prior():
    logits = torch.zeros(1, 1, 2, 3)
    logits[0, 0, :, 1] = 2.0  # the student spells token 0 ([1, 1]) best
    spelling = torch.tensor([[1, 1], [2, 2]])
    top = torch.tensor([[[0, 1, 0, 0, 0]]])
    spellable = torch.tensor([True, True])
    assert select_labels(logits, top, spelling, spellable).token_ids.item() == 0
    teacher = torch.tensor([[[1e-6, 0.99, 0.0, 0.0, 0.0]]])  # but the teacher is sure of token 1
    assert select_labels(logits, top, spelling, spellable, teacher).token_ids.item() == 1
