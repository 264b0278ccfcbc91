import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from spellm_ds.distill.losses import (
    LabelRule,
    Labels,
    LossRecipe,
    candidate_nll,
    choose_labels,
    distillation_loss,
    rare_label_weights,
    select_labels,
    token_regulariser,
)
from spellm_ds.distill.teacher import TeacherSignal, top_tokens_from_hidden
from spellm_ds.model.charset import END_ID


def read_length(chars: list[int]) -> int:
    """Characters up to and including the first END (all of them when there is none)."""
    return chars.index(END_ID) + 1 if END_ID in chars else len(chars)


def brute_force_label(char_logp, cands, spelling, spellable, prior=None, weight=1.0, ignore_after_end=False,
                      top1=False, per_char=False, gate=None, top1_prob=0.0):
    """The spellable candidate with the lowest char NLL (per counted character with ``per_char``;
    minus weight x log p_teacher with ``prior``), or with ``top1`` the first spellable one; with
    ``gate``, the first candidate when it is spellable and ``top1_prob`` >= ``gate``."""
    if gate is not None and top1_prob >= gate and spellable[cands[0]]:
        return cands[0].item()
    best, best_score = None, float("inf")
    for i, token in enumerate(cands.tolist()):
        if not spellable[token]:
            continue
        chars = spelling[token].tolist()
        counted = read_length(chars) if ignore_after_end else len(chars)
        score = i if top1 else -sum(char_logp[j, chars[j]].item() for j in range(counted))
        if per_char:
            score /= counted
        if prior is not None and not top1:
            score -= weight * math.log(prior[i].item())
        if score < best_score:
            best, best_score = token, score
    return best


RULES = [LabelRule("student_nll"), LabelRule("joint"), LabelRule("joint", 0.3), LabelRule("joint", 1.0, True),
         LabelRule("student_nll", 1.0, True), LabelRule("teacher_top1"), LabelRule("joint", 1.0, True, per_char=True),
         LabelRule("joint", 1.0, True, gate=0.5), LabelRule("student_nll", gate=0.3)]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.name}-{r.prior_weight}-{r.ignore_after_end}-{r.per_char}-{r.gate}")
def test_label_selection_matches_brute_force(rule):
    g = torch.Generator().manual_seed(0)
    V, k, C, B, T = 50, 4, 7, 3, 5
    spelling = torch.randint(0, C, (V, k), generator=g)  # END (0) anywhere: junk after it to ignore
    spellable = torch.rand(V, generator=g) > 0.3
    spellable[:3] = False
    logits = torch.randn(B, T, k, C, generator=g)
    top = torch.randint(0, V, (B, T, 5), generator=g)
    top[0, 0] = torch.tensor([0, 1, 2, 0, 1])  # no spellable candidate: masked
    probs = torch.softmax(3 * torch.randn(B, T, 5, generator=g), -1)  # a teacher prior strong enough to matter
    signal = TeacherSignal(top, probs, torch.zeros(B, T))
    table = SimpleNamespace(chars=spelling, spellable=spellable)
    labels = choose_labels(rule, logits, signal, table)
    prior = probs if rule.name == "joint" else None
    unweighted = select_labels(logits, top, spelling, spellable)
    logp = torch.log_softmax(logits, -1)
    for b, t in itertools.product(range(B), range(T)):
        expected = brute_force_label(logp[b, t], top[b, t], spelling, spellable,
                                     None if prior is None else prior[b, t], rule.prior_weight,
                                     rule.ignore_after_end, rule.name == "teacher_top1", rule.per_char, rule.gate,
                                     probs[b, t, 0].item())
        if expected is None:
            assert not labels.valid[b, t]
        else:
            assert labels.valid[b, t] and labels.token_ids[b, t].item() == expected
            assert torch.equal(labels.chars[b, t], spelling[expected])
    assert not labels.valid[0, 0] and labels.valid.sum() >= B * T - 3
    differs = (labels.token_ids != unweighted.token_ids) & labels.valid
    assert differs.any() == (rule != LabelRule("student_nll"))  # each variation changes some labels


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
    signal = TeacherSignal(top, torch.full((2, 4, 5), 0.1), torch.zeros(2, 4))
    table = SimpleNamespace(chars=spelling, spellable=spellable)
    recipe = LossRecipe(reg_weight=0.5, soft_char_weight=0.2)
    parts = distillation_loss(char_logits, token_logits, labels, signal, table, recipe)
    assert all(part.dtype == torch.float32 for part in parts)
    ref = distillation_loss(char_logits.float(), token_logits.float(), labels, signal, table, recipe)
    assert torch.equal(parts.total, ref.total)
    manual_char = torch.nn.functional.cross_entropy(char_logits.float().reshape(-1, C), labels.chars.reshape(-1))
    assert torch.allclose(parts.char, manual_char)
    assert torch.allclose(parts.total, parts.char + 0.5 * parts.token + 0.2 * parts.soft_char)


def test_masked_positions_do_not_count():
    C, k = 5, 2
    spelling = torch.tensor([[1, 2], [3, 4]])
    spellable = torch.tensor([True, False])
    logits = torch.randn(1, 2, k, C)
    top = torch.tensor([[[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]])
    labels = select_labels(logits, top, spelling, spellable)
    signal = TeacherSignal(top, torch.full((1, 2, 5), 0.2), torch.zeros(1, 2))
    parts = distillation_loss(logits, None, labels, signal, SimpleNamespace(chars=spelling, spellable=spellable),
                              LossRecipe(reg_weight=0.0))
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


def test_ignore_after_end_counts_each_label_up_to_its_first_end():
    g = torch.Generator().manual_seed(3)
    C, k = 6, 4
    spelling = torch.tensor([[2, 0, 3, 4], [2, 3, 4, 5], [5, 0, 0, 0]])  # junk after END in token 0
    spellable = torch.ones(3, dtype=torch.bool)
    logits = torch.randn(1, 3, k, C, generator=g)
    top = torch.tensor([[[0] * 5, [1] * 5, [2] * 5]])
    signal = TeacherSignal(top, torch.full((1, 3, 5), 0.2), torch.zeros(1, 3))
    table = SimpleNamespace(chars=spelling, spellable=spellable)
    labels = select_labels(logits, top, spelling, spellable)
    parts = distillation_loss(logits, None, labels, signal, table, LossRecipe(reg_weight=0.0, ignore_after_end=True))
    logp = torch.log_softmax(logits[0], -1)
    terms = [-logp[t, j, spelling[t, j]] for t in range(3) for j in range(read_length(spelling[t].tolist()))]
    assert len(terms) == 2 + 4 + 2
    assert torch.allclose(parts.char, torch.stack(terms).mean())


def test_rare_label_weights_make_the_char_loss_a_mean_weighted_by_each_labels_count():
    counts = torch.tensor([99, 0, 3, 8])
    weights = rare_label_weights(counts, 0.5)
    assert torch.allclose(weights, torch.tensor([0.1, 1.0, 0.5, 1 / 3]))
    assert torch.equal(rare_label_weights(counts, 0.0), torch.ones(4))
    g = torch.Generator().manual_seed(5)
    C, k = 6, 3
    spelling = torch.tensor([[2, 3, 4], [5, 0, 0], [4, 4, 0], [3, 0, 0]])
    spellable = torch.ones(4, dtype=torch.bool)
    logits = torch.randn(1, 3, k, C, generator=g)
    top = torch.tensor([[[0] * 5, [1] * 5, [2] * 5]])  # the labels: tokens 0, 1, 2
    signal = TeacherSignal(top, torch.full((1, 3, 5), 0.2), torch.zeros(1, 3))
    table = SimpleNamespace(chars=spelling, spellable=spellable)
    labels = select_labels(logits, top, spelling, spellable)
    recipe = LossRecipe(reg_weight=0.0, ignore_after_end=True)
    weighted = distillation_loss(logits, None, labels, signal, table, recipe, label_weights=weights).char
    logp = torch.log_softmax(logits[0], -1)
    terms = [(weights[t], -logp[t, j, spelling[t, j]])
             for t in range(3) for j in range(read_length(spelling[t].tolist()))]
    expected = sum(w * nll for w, nll in terms) / sum(w for w, _ in terms)
    assert torch.allclose(weighted, expected)
    plain = distillation_loss(logits, None, labels, signal, table, recipe).char
    assert not torch.allclose(weighted, plain)
    assert torch.allclose(distillation_loss(logits, None, labels, signal, table, recipe,
                                            label_weights=torch.full((4,), 0.3)).char, plain)  # a constant cancels


def test_teacher_regulariser_is_the_top5_plus_rest_kl():
    g = torch.Generator().manual_seed(4)
    V = 12
    token_logits = torch.randn(2, 3, V, generator=g)
    teacher_logp = torch.log_softmax(torch.randn(2, 3, V, generator=g), -1)
    top_logp, top = teacher_logp.topk(5, -1)
    signal = TeacherSignal(top, top_logp.exp(), torch.zeros(2, 3))
    labels = SimpleNamespace(valid=torch.ones(2, 3, dtype=torch.bool), token_ids=top[..., 0])
    kl = token_regulariser(token_logits, labels, signal, "teacher")
    q = torch.softmax(token_logits, -1)
    expected = []
    for b, t in itertools.product(range(2), range(3)):
        p_top, q_top = top_logp[b, t].exp(), q[b, t, top[b, t]]
        buckets_p = torch.cat([p_top, (1 - p_top.sum()).view(1)])
        buckets_q = torch.cat([q_top, (1 - q_top.sum()).view(1)])
        expected.append((buckets_p * (buckets_p / buckets_q).log()).sum())
    assert torch.allclose(kl, torch.stack(expected).mean(), atol=1e-6)
    # the student's own distribution as the teacher's: no divergence
    same = TeacherSignal(*torch.log_softmax(token_logits, -1).topk(5, -1)[::-1], torch.zeros(2, 3))
    same = same._replace(top_probs=same.top_probs.exp())
    assert token_regulariser(token_logits, labels, same, "teacher").abs() < 1e-6
    ce = token_regulariser(token_logits, labels, signal, "label")
    assert torch.allclose(ce, -torch.log_softmax(token_logits, -1).gather(-1, top[..., :1]).mean())


def test_soft_char_loss_is_the_probability_weighted_candidate_nll():
    g = torch.Generator().manual_seed(5)
    C, k, V = 6, 3, 8
    spelling = torch.randint(0, C, (V, k), generator=g)
    spellable = torch.ones(V, dtype=torch.bool)
    spellable[7] = False
    logits = torch.randn(1, 2, k, C, generator=g)
    top = torch.tensor([[[1, 2, 3, 7, 4], [5, 6, 1, 2, 3]]])
    probs = torch.tensor([[[0.5, 0.2, 0.1, 0.1, 0.05], [0.3, 0.3, 0.2, 0.1, 0.05]]])
    signal = TeacherSignal(top, probs, torch.zeros(1, 2))
    table = SimpleNamespace(chars=spelling, spellable=spellable)
    labels = select_labels(logits, top, spelling, spellable)
    parts = distillation_loss(logits, None, labels, signal, table, LossRecipe(reg_weight=0.0, soft_char_weight=1.0))
    logp = torch.log_softmax(logits[0], -1)
    per_position = []
    for t in range(2):
        ids = [i for i in range(5) if spellable[top[0, t, i]]]
        weights = probs[0, t, ids] / probs[0, t, ids].sum()
        nll = [-logp[t, torch.arange(k), spelling[top[0, t, i]]].mean() for i in ids]
        per_position.append((weights * torch.stack(nll)).sum())
    assert torch.allclose(parts.soft_char, torch.stack(per_position).mean())
    assert torch.allclose(parts.total, parts.char + parts.soft_char)


@pytest.mark.parametrize("ignore_after_end", [False, True])
def test_soft_char_loss_over_every_token_is_the_teachers_expected_char_nll(ignore_after_end):
    """With the whole vocabulary as the wide candidates (``--soft_char_candidates`` = V), the soft loss
    is the mean per-character NLL of a token drawn from the teacher's distribution over the spellable
    tokens; from the top-5 alone the same teacher gives another value."""
    g = torch.Generator().manual_seed(11)
    C, k, V, B, T = 6, 4, 12, 2, 3
    spelling = torch.randint(0, C, (V, k), generator=g)  # END (0) anywhere
    spellable = torch.ones(V, dtype=torch.bool)
    spellable[[3, 8]] = False
    logits = torch.randn(B, T, k, C, generator=g)
    teacher_logp = torch.log_softmax(2 * torch.randn(B, T, V, generator=g), -1)
    top_logp, top = teacher_logp.topk(5, -1)
    wide_logp, wide = teacher_logp.topk(V, -1)
    signal = TeacherSignal(top, top_logp.exp(), torch.zeros(B, T), None, wide, wide_logp.exp())
    table = SimpleNamespace(chars=spelling, spellable=spellable)
    labels = select_labels(logits, top, spelling, spellable, ignore_after_end=ignore_after_end)
    assert labels.valid.all()
    recipe = LossRecipe(reg_weight=0.0, soft_char_weight=1.0, ignore_after_end=ignore_after_end)
    soft = distillation_loss(logits, None, labels, signal, table, recipe).soft_char
    logp = torch.log_softmax(logits, -1)
    expected = []
    for b, t in itertools.product(range(B), range(T)):
        p = teacher_logp[b, t].exp() * spellable
        p = p / p.sum()
        nll = []
        for token in range(V):
            chars = spelling[token].tolist()
            counted = read_length(chars) if ignore_after_end else k
            nll.append(-sum(logp[b, t, j, chars[j]] for j in range(counted)) / counted)
        expected.append((p * torch.stack(nll)).sum())
    assert torch.allclose(soft, torch.stack(expected).mean())
    top5 = distillation_loss(logits, None, labels, signal._replace(wide_ids=None, wide_probs=None), table, recipe)
    assert abs(top5.soft_char - soft) > 1e-3


@pytest.mark.parametrize("ignore_after_end", [False, True])
def test_soft_char_prefix_targets_follow_the_labels_path(ignore_after_end):
    """``--soft_char_prefix``: head i's CE is with the characters of the candidates spelling the
    label's first i characters (renormalised teacher probabilities), averaged over the heads that
    have any; head 0 reads every candidate, and the loss differs from the plain targets'."""
    g = torch.Generator().manual_seed(3)
    C, k, V, B, T = 4, 4, 16, 2, 5
    spelling = torch.randint(0, C, (V, k), generator=g)  # 4 characters: candidates share prefixes often
    spellable = torch.ones(V, dtype=torch.bool)
    spellable[[2, 9]] = False
    logits = torch.randn(B, T, k, C, generator=g)
    top_logp, top = torch.log_softmax(2 * torch.randn(B, T, V, generator=g), -1).topk(5, -1)
    signal = TeacherSignal(top, top_logp.exp(), torch.zeros(B, T))
    table = SimpleNamespace(chars=spelling, spellable=spellable)
    labels = select_labels(logits, top, spelling, spellable, ignore_after_end=ignore_after_end)
    assert labels.valid.all()
    recipe = LossRecipe(reg_weight=0.0, soft_char_weight=1.0, ignore_after_end=ignore_after_end, soft_char_prefix=True)
    soft = distillation_loss(logits, None, labels, signal, table, recipe).soft_char
    logp = torch.log_softmax(logits, -1)
    expected = []
    for b, t in itertools.product(range(B), range(T)):
        label = labels.chars[b, t].tolist()
        heads = []
        for i in range(k):
            on_path = []
            for j, token in enumerate(top[b, t].tolist()):
                chars = spelling[token].tolist()
                counted = read_length(chars) if ignore_after_end else k
                if spellable[token] and i < counted and chars[:i] == label[:i]:
                    on_path.append((top_logp[b, t, j].exp(), chars[i]))
            if on_path:
                total = sum(p for p, _ in on_path)
                heads.append(-sum(p / total * logp[b, t, i, c] for p, c in on_path))
        expected.append(torch.stack(heads).mean())
    assert torch.allclose(soft, torch.stack(expected).mean())
    plain = distillation_loss(logits, None, labels, signal, table, LossRecipe(
        reg_weight=0.0, soft_char_weight=1.0, ignore_after_end=ignore_after_end)).soft_char
    assert abs(plain - soft) > 1e-3


def test_the_teachers_wide_top_m_leaves_its_top_k_unchanged():
    """``wide_k`` adds the top-M, sorted, with their probabilities under the full softmax, across
    chunk boundaries; the top-5 and the entropy are bit for bit those of a signal without it."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 70, 8, generator=g)
    lm_head = torch.nn.Linear(8, 40, bias=False)
    torch.nn.init.normal_(lm_head.weight, generator=g)
    plain = top_tokens_from_hidden(hidden, lm_head, chunk=16)
    wide = top_tokens_from_hidden(hidden, lm_head, chunk=16, wide_k=12)
    assert plain.wide_ids is None and plain.wide_probs is None
    for name in ("top_ids", "top_probs", "entropy"):
        assert torch.equal(getattr(plain, name), getattr(wide, name))
    with torch.no_grad():
        probs = torch.softmax(lm_head(hidden).float(), -1)
    assert wide.wide_ids.shape == (2, 70, 12)
    assert torch.allclose(wide.wide_probs, probs.sort(-1, descending=True).values[..., :12])
    assert torch.allclose(probs.gather(-1, wide.wide_ids), wide.wide_probs)


def test_spelling_kl_is_the_kl_to_the_heads_normalised_token_distribution(byte_level_tokenizer):
    """Against an explicit sum over every valid spelling; and descending it raises the probability
    the heads give a second candidate (what likelihood scoring reads)."""
    from spellm_ds.hf.char_decoding import CharDecoder, after_first_end
    from spellm_ds.model.charset import Charset
    from spellm_ds.model.spelling import SpellingTable

    table = SpellingTable.from_tokenizer(byte_level_tokenizer, Charset.default(), k=6, vocab_size=len(byte_level_tokenizer))
    g = torch.Generator().manual_seed(3)
    valid_ids = table.canonical.nonzero().squeeze(1)
    top = valid_ids[torch.randint(0, len(valid_ids), (1, 2, 5), generator=g)]
    probs = torch.tensor([[[0.6, 0.2, 0.1, 0.05, 0.05], [0.4, 0.3, 0.1, 0.1, 0.05]]])
    signal = TeacherSignal(top, probs, torch.zeros(1, 2))
    logits = (2 * torch.randn(1, 2, 6, len(table.charset), generator=g)).requires_grad_()
    labels = select_labels(logits, top, table.chars, table.spellable)
    decoder = CharDecoder(table)
    parts = distillation_loss(logits, None, labels, signal, table, LossRecipe(reg_weight=0.0, spelling_kl_weight=2.0),
                              decoder=decoder)
    logp = torch.log_softmax(logits[0].detach(), -1)
    expected = []
    for t in range(2):
        def score(token):
            chars = table.chars[token]
            return sum(logp[t, j, c] for j, c in enumerate(chars.tolist()) if not after_first_end(chars)[j])
        normaliser = torch.logsumexp(torch.stack([score(v) for v in valid_ids.tolist()]), 0)
        p = probs[0, t] / probs[0, t].sum()
        expected.append(sum(p[i] * (p[i].log() - (score(top[0, t, i].item()) - normaliser)) for i in range(5)))
    assert torch.allclose(parts.spelling_kl, torch.stack(expected).mean(), atol=1e-5)
    assert torch.allclose(parts.total, parts.char + 2.0 * parts.spelling_kl)
    with pytest.raises(ValueError, match="CharDecoder"):
        distillation_loss(logits, None, labels, signal, table, LossRecipe(spelling_kl_weight=1.0))
    before = decoder.spelling_log_probs(logits[0].detach(), top[0, :, 1])
    optimizer = torch.optim.SGD([logits], lr=0.5)
    for _ in range(20):
        optimizer.zero_grad()
        distillation_loss(logits, None, labels, signal, table, LossRecipe(reg_weight=0.0, spelling_kl_weight=1.0),
                          decoder=decoder).spelling_kl.backward()
        optimizer.step()
    after = decoder.spelling_log_probs(logits[0].detach(), top[0, :, 1])
    target = (probs[0, :, 1] / probs[0].sum(-1)).log()  # the teacher's
    assert (after > before + 0.5).all() and ((after - target).abs() < (before - target).abs()).all()


def test_sampled_spelling_kl_keeps_the_expectation_of_the_loss_and_its_gradient(byte_level_tokenizer):
    """--spelling_kl_fraction: averaged over many samples the loss and its gradient are the full
    ones (an unscaled sample would be off by 1 / fraction); one sample is a function of its generator."""
    from spellm_ds.hf.char_decoding import CharDecoder
    from spellm_ds.model.charset import Charset
    from spellm_ds.model.spelling import SpellingTable

    table = SpellingTable.from_tokenizer(byte_level_tokenizer, Charset.default(), k=6,
                                         vocab_size=len(byte_level_tokenizer))
    decoder = CharDecoder(table, tau=None)
    g = torch.Generator().manual_seed(5)
    valid_ids = table.canonical.nonzero().squeeze(1)
    top = valid_ids[torch.randint(0, len(valid_ids), (2, 8, 5), generator=g)]
    probs = torch.softmax(2 * torch.randn(2, 8, 5, generator=g), -1) * 0.9
    signal = TeacherSignal(top, probs, torch.zeros(2, 8))
    logits = (2 * torch.randn(2, 8, 6, len(table.charset), generator=g)).requires_grad_()
    labels = select_labels(logits, top, table.chars, table.spellable)
    labels = labels._replace(valid=labels.valid & (torch.arange(8) != 3))  # one masked position per row

    def kl_and_grad(fraction, generator=None):
        recipe = LossRecipe(reg_weight=0.0, spelling_kl_weight=1.0, spelling_kl_fraction=fraction)
        kl = distillation_loss(logits, None, labels, signal, table, recipe, decoder=decoder,
                               generator=generator).spelling_kl
        return kl.detach(), torch.autograd.grad(kl, logits)[0]

    full, full_grad = kl_and_grad(1.0)
    draws = [kl_and_grad(0.25, torch.Generator().manual_seed(seed)) for seed in range(400)]
    values = torch.stack([kl for kl, _ in draws])
    grads = torch.stack([grad for _, grad in draws])
    assert (values.mean() - full).abs() < 4 * values.std() / 20 and values.std() > 0.05 * full  # 20 = sqrt(400)
    grad_error = (grads.mean(0) - full_grad).abs()
    assert (grad_error <= 4 * grads.std(0) / 20 + 1e-6).float().mean() > 0.99
    assert torch.equal(kl_and_grad(0.25, torch.Generator().manual_seed(7))[0], values[7])


def test_mean_over_ranks_makes_the_ranks_average_the_global_batch_mean():
    """Two 'ranks' holding one sequence each, with different numbers of counted characters and valid
    positions: averaging their losses (as DeepSpeed averages gradients) gives the loss of the whole
    batch on one rank only when each divides by the mean count over the ranks."""
    g = torch.Generator().manual_seed(5)
    C, k, V = 6, 4, 4
    spelling = torch.tensor([[2, 0, 3, 4], [2, 3, 4, 5], [5, 0, 0, 0], [1, 2, 0, 0]])
    spellable = torch.tensor([True, True, True, False])
    table = SimpleNamespace(chars=spelling, spellable=spellable)
    top = torch.tensor([[[0] * 5, [1] * 5, [3] * 5], [[2] * 5, [2] * 5, [1] * 5]])
    signal = TeacherSignal(top, torch.full((2, 3, 5), 0.2), torch.zeros(2, 3))
    char_logits, token_logits = torch.randn(2, 3, k, C, generator=g), torch.randn(2, 3, V, generator=g)
    labels = select_labels(char_logits, top, spelling, spellable, ignore_after_end=True)
    recipe = LossRecipe(reg_weight=0.5, reg_target="label", soft_char_weight=0.3, ignore_after_end=True)

    def rank_loss(rank: int, mean_over_ranks=lambda counts: counts):
        rows = slice(rank, rank + 1)
        return distillation_loss(char_logits[rows], token_logits[rows], Labels(*(x[rows] for x in labels)),
                                 TeacherSignal(*(None if x is None else x[rows] for x in signal)), table, recipe,
                                 mean_over_ranks)

    counts = []
    for rank in (0, 1):
        rank_loss(rank, lambda c: counts.append(c) or c)
    assert not torch.equal(counts[0], counts[1])  # the case that needs the global count
    mean_counts = (counts[0] + counts[1]) / 2
    whole = distillation_loss(char_logits, token_logits, labels, signal, table, recipe)
    averaged = [torch.stack(parts).mean() for parts in zip(rank_loss(0, lambda c: mean_counts),
                                                             rank_loss(1, lambda c: mean_counts))]
    assert torch.allclose(torch.stack(averaged), torch.stack(list(whole)), rtol=1e-6)
    per_rank_means = torch.stack([torch.stack(parts).mean() for parts in zip(rank_loss(0), rank_loss(1))])
    assert not torch.allclose(per_rank_means[:3], torch.stack(list(whole))[:3], rtol=1e-3)
