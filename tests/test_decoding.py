import copy

import pytest
import torch

from spellm_ds.hf.char_decoding import (
    CharDecoder,
    Provenance,
    best_candidate,
    frequent_spellings,
    mean_head_entropy,
    read_string,
    sample,
)
from spellm_ds.model.charset import END_ID, UNK_ID, Charset
from spellm_ds.model.decoding import generate
from spellm_ds.model.spelling import SpellingTable
from spellm_ds.model.spellm import untrained
from tests import tiny

K = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model_dir = tiny.tiny_llama_dir(tmp_path_factory.mktemp("dec") / "base", tiny.corpus_texts(80))
    spellm = untrained(model_dir, k=K, head_init="random")
    torch.manual_seed(0)
    torch.nn.init.normal_(spellm.char_heads.proj.weight, std=0.5)
    return spellm.eval()


@pytest.fixture(scope="module")
def table(byte_level_tokenizer):
    return SpellingTable.from_tokenizer(byte_level_tokenizer, Charset.default(), k=8, vocab_size=len(byte_level_tokenizer))


def read_length(chars: list[int]) -> int:
    return chars.index(END_ID) + 1 if END_ID in chars else len(chars)


def brute_force_autocorrect(logp, table):
    """The canonical token whose characters up to its first END score highest."""
    best, best_score = None, -float("inf")
    for v in range(table.vocab_size):
        if not table.canonical[v]:
            continue
        chars = table.chars[v].tolist()
        score = sum(logp[j, chars[j]].item() for j in range(read_length(chars)))
        if score > best_score:
            best, best_score = v, score
    return best


@pytest.mark.parametrize("k", [8, 7])  # the heads are read in pairs: an odd k leaves one on its own
def test_autocorrect_is_the_vocabulary_argmax(byte_level_tokenizer, k):
    table = SpellingTable.from_tokenizer(byte_level_tokenizer, Charset.default(), k=k,
                                         vocab_size=len(byte_level_tokenizer))
    decoder = CharDecoder(table, tau=None)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, table.k, len(table.charset), generator=g) * 3
    fixed = decoder.autocorrect(logits)
    logp = torch.log_softmax(logits, -1)
    for row in range(300):
        assert fixed[row].item() == brute_force_autocorrect(logp[row], table)
    # Exact hits are never changed: logits peaked on valid spellings decode to those tokens.
    valid = table.canonical.nonzero().squeeze(1)
    peaked = torch.full((len(valid), table.k, len(table.charset)), -5.0)
    peaked.scatter_(2, table.chars[valid].unsqueeze(-1), 5.0)
    peaked[:, :, 2] += 4.0  # a strong runner-up char everywhere
    proposal = decoder.propose(peaked)
    assert proposal.hit.all() and torch.equal(proposal.token_ids, valid)


def test_a_string_ends_at_its_first_end(table):
    """'<tok><end>junk' names <tok>, and its entropy counts only the heads up to that END."""
    token = int((table.exact & (table.lengths == 2)).nonzero()[0])
    logits = torch.full((1, table.k, len(table.charset)), -4.0)
    logits[0, torch.arange(table.k), table.chars[token]] = 4.0
    logits[0, 3:, :] = torch.randn(table.k - 3, len(table.charset))  # untrained heads after the END
    logits[0, 3, UNK_ID] = 9.0  # even an UNK there is ignored
    assert read_string(logits)[0].tolist() == table.chars[token].tolist()
    proposal = CharDecoder(table, tau=0.5).propose(logits)
    assert proposal.hit.item() and proposal.token_ids.item() == token
    logp = torch.log_softmax(logits[0], -1)
    per_head = -(logp.exp() * logp).sum(-1)
    assert torch.allclose(mean_head_entropy(logits), per_head[:3].mean().view(1))
    assert not proposal.fallback.item()


def test_token_distribution_is_normalised_and_shares_a_spelling_among_its_tokens(table):
    decoder = CharDecoder(table)
    logits = torch.randn(4, table.k, len(table.charset))
    log_probs = decoder.token_log_probs(logits)
    assert torch.allclose(log_probs.logsumexp(-1), torch.zeros(4), atol=1e-5)
    assert torch.isinf(log_probs[:, ~table.spellable]).all() and not torch.isinf(log_probs[:, table.spellable]).any()
    shadowed = (table.spellable & ~table.canonical).nonzero().squeeze(1)
    assert len(shadowed)  # the tiny tokenizer has long tokens that share their first k characters
    canonical = table.lookup(table.chars[shadowed])
    assert torch.equal(log_probs[:, shadowed], log_probs[:, canonical])  # an even share each
    spelling = log_probs[:, canonical] + table.shared_by[canonical].float().log()  # the whole spelling's
    assert torch.allclose(spelling, decoder.spelling_log_probs(logits.repeat_interleave(len(shadowed), 0),
                                                                canonical.repeat(4)).view(4, -1)
                          + table.shared_by[canonical].float().log(), atol=1e-5)
    whole = log_probs[:, decoder.valid_ids] + table.shared_by[decoder.valid_ids].float().log()
    assert torch.equal(decoder.valid_ids[whole.argmax(-1)], decoder.autocorrect(logits))
    assert torch.equal(sample(log_probs, top_k=1), log_probs.argmax(-1))


def test_spelling_temperature_spreads_the_token_distribution_and_changes_no_decision(table):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(32, table.k, len(table.charset), generator=g) * torch.linspace(0.5, 6, 32).view(32, 1, 1)
    plain, warm = CharDecoder(table, tau=0.5), CharDecoder(table, tau=0.5, temperature=2.5)
    trained, tempered = plain.token_log_probs(logits), warm.token_log_probs(logits)
    valid = table.canonical
    share = table.shared_by[valid].float().log()  # a spelling's probability is its tokens' together
    assert torch.allclose(tempered[:, valid] + share, torch.log_softmax((trained[:, valid] + share) / 2.5, -1),
                          atol=1e-5)
    assert torch.allclose(tempered.logsumexp(-1), torch.zeros(32), atol=1e-5)
    assert (tempered[:, valid].exp().max(-1).values < trained[:, valid].exp().max(-1).values).all()  # flatter
    token_ids = torch.arange(32) * 7 % table.vocab_size
    assert torch.allclose(warm.spelling_log_probs(logits, token_ids)[valid[token_ids]],
                          tempered[valid[token_ids], token_ids[valid[token_ids]]], atol=1e-5)
    for got, want in zip(warm.propose(logits), plain.propose(logits)):  # tokens, hits, fallback, entropy
        assert torch.equal(got, want)
    assert torch.equal(warm.autocorrect(logits), plain.autocorrect(logits))
    with pytest.raises(ValueError, match="temperature 0"):
        CharDecoder(table, temperature=0)


def test_fallback_rows_are_exactly_those_at_or_above_tau(table):
    logits = torch.randn(64, table.k, len(table.charset)) * torch.linspace(0.1, 8, 64).view(64, 1, 1)
    entropy = CharDecoder(table, tau=None).propose(logits).entropy
    tau = entropy.median().item()
    proposal = CharDecoder(table, tau=tau).propose(logits)
    has_unk = (read_string(logits) == UNK_ID).any(-1)
    assert torch.equal(proposal.fallback, (entropy >= tau) | has_unk)
    assert not CharDecoder(table, tau=None).propose(logits).fallback.any()
    assert CharDecoder(table, tau=0.0).propose(logits).fallback.all()


def test_propose_needs_no_host_sync(table):
    """Meta tensors have no data: any .item()/.cpu()/boolean indexing inside would raise."""
    decoder = CharDecoder(table, tau=0.22).to("meta")
    proposal = decoder.propose(torch.empty(8, table.k, len(table.charset), device="meta"))
    assert proposal.token_ids.shape == (8,) and proposal.token_ids.device.type == "meta"


def constructed_model(model, sequence):
    """Zero every layer's output so the final hidden state is the current token's normalised
    embedding; give each sequence token its own axis; heads spell the successor of each token."""
    spellm = copy.deepcopy(model)
    base = spellm.base
    with torch.no_grad():
        for layer in base.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = base.get_input_embeddings().weight
        emb.mul_(0.01)
        for axis, token in enumerate(sequence):
            emb[token] = 0
            emb[token, axis] = 1.0
        weight = torch.zeros(K, len(model.spelling.charset), emb.shape[1])
        for axis, (token, successor) in enumerate(zip(sequence, sequence[1:])):
            for j, c in enumerate(spellm.spelling.chars[successor].tolist()):
                weight[j, c, axis] = 10.0
        spellm.char_heads.proj.weight.copy_(weight.view(K * len(model.spelling.charset), -1))
        spellm.char_heads.proj.bias.zero_()
    return spellm.eval()


def test_constructed_heads_generate_the_known_sequence(model):
    table = model.spelling
    candidates = (table.canonical & (table.lengths <= K) & (table.lengths >= 2)).nonzero().squeeze(1)
    sequence = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(3))[:8]].tolist()
    spellm = constructed_model(model, sequence)
    out = generate(spellm, torch.tensor([[sequence[0]]]), max_new_tokens=7, tau=0.22, eos_token_id=None)
    assert out.sequences[0].tolist() == sequence[1:]
    assert (out.provenance == Provenance.EXACT).all()
    assert out.counts() == {"exact": 7, "autocorrected": 0, "fallback": 0, "reranked": 0}
    # re-ranking the heads' best spelling alone changes nothing but keeps the LM head out of it
    assert torch.equal(generate(spellm, torch.tensor([[sequence[0]]]), max_new_tokens=7, tau=0.22, eos_token_id=None,
                                       rerank_k=1).sequences, out.sequences)
    # among more spellings the LM head (here random) may choose others: each is marked RERANKED
    reranked = generate(spellm, torch.tensor([[sequence[0]]]), max_new_tokens=1, tau=None, eos_token_id=None,
                               rerank_k=50)
    first_choice = reranked.sequences[0, 0].item()
    assert (reranked.provenance[0, 0] == Provenance.EXACT) == (first_choice == sequence[1])


def test_tau_zero_is_greedy_decoding_with_the_token_head(model):
    ids = torch.tensor([[5, 17, 42, 9]])
    out = generate(model, ids, max_new_tokens=10, tau=0.0, eos_token_id=None)
    assert (out.provenance == Provenance.FALLBACK).all()
    reference = model.base.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0,
                                    min_new_tokens=10)
    assert out.sequences[0].tolist() == reference[0, 4:].tolist()


def test_batched_generation_equals_one_prompt_at_a_time(model):
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    prompts = ["The river flows", "In 1998 the national team of the country won", "A"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    together = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=12, tau=0.5)
    for row, prompt in enumerate(prompts):
        alone = generate(model, tokenizer(prompt, return_tensors="pt")["input_ids"], max_new_tokens=12, tau=0.5)
        n = alone.sequences.shape[1]
        assert together.sequences[row, :n].tolist() == alone.sequences[0].tolist(), prompt
        assert together.provenance[row, :n].tolist() == alone.provenance[0].tolist(), prompt
    assert set(together.counts()) == {"exact", "autocorrected", "fallback", "reranked"}


def test_spelling_log_probs_score_every_spellable_token_by_its_spelling(table):
    decoder = CharDecoder(table)
    logits = torch.randn(table.vocab_size, table.k, len(table.charset))
    token_ids = torch.arange(table.vocab_size)
    scores = decoder.spelling_log_probs(logits, token_ids)
    full = decoder.token_log_probs(logits)
    canonical = table.canonical
    assert torch.allclose(scores[canonical], full[canonical, token_ids[canonical]],
                          atol=1e-5)
    assert torch.isinf(scores[~table.spellable]).all() and (scores[~table.spellable] < 0).all()
    shadowed = (table.spellable & ~canonical).nonzero().squeeze(1)
    assert len(shadowed) > 0  # " café" and " cafe" share a spelling, as do the long words' first 8 chars
    for v in shadowed.tolist():  # a non-canonical token gets an even share of its spelling's probability
        owner = (canonical & (table.chars == table.chars[v]).all(-1)).nonzero().item()
        logp = torch.log_softmax(logits[v], -1)
        normaliser = decoder.spelling_scores(logp[None]).logsumexp(-1)
        chars = table.chars[v].tolist()
        own = sum(logp[j, chars[j]] for j in range(read_length(chars))) - normaliser
        sharing = int((table.spellable & (table.chars == table.chars[v]).all(-1)).sum())
        assert sharing == table.shared_by[v] >= 2
        assert torch.allclose(scores[v], own[0] - torch.tensor(float(sharing)).log(), atol=1e-5)
        assert owner != v


def test_propose_and_score_is_propose_plus_spelling_log_probs(table):
    """The one-pass path the analysis and downstream scoring use gives what the two calls give."""
    decoder = CharDecoder(table, tau=1.0)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, table.k, len(table.charset), generator=g) * torch.linspace(0.1, 8, 64).view(64, 1, 1)
    valid = table.canonical.nonzero().squeeze(1)[:16]
    logits[:16].scatter_(2, table.chars[valid].unsqueeze(-1), 40.0)  # 16 rows spell a valid token
    token_ids = torch.randint(0, table.vocab_size, (64,), generator=g)
    proposal, log_probs = decoder.propose_and_score(logits, token_ids)
    expected = decoder.propose(logits)
    missed = ~expected.hit
    assert expected.hit[:16].all() and (missed & ~expected.fallback).any() and expected.fallback.any()  # every branch
    for got, want in zip(proposal, expected):
        assert torch.equal(got, want)
    assert torch.equal(log_probs, decoder.spelling_log_probs(logits, token_ids))


def test_decoding_without_autocorrect_stops_at_the_first_miss(model):
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    ids = tokenizer(["The river flows", "In 1998 the national"], return_tensors="pt", padding=True)
    args = (ids["input_ids"], ids["attention_mask"], 12)
    eos = tokenizer.eos_token_id
    corrected = generate(model, *args, tau=None, eos_token_id=eos)
    raw = generate(model, *args, tau=None, eos_token_id=eos, autocorrect=False)
    assert (corrected.provenance == Provenance.AUTOCORRECTED).any()  # random heads miss often
    for row in range(2):
        origins = corrected.provenance[row].tolist()
        first_miss = origins.index(Provenance.AUTOCORRECTED) if Provenance.AUTOCORRECTED in origins else len(origins)
        assert raw.sequences[row, :first_miss].tolist() == corrected.sequences[row, :first_miss].tolist()
        if first_miss < raw.sequences.shape[1]:
            assert raw.sequences[row, first_miss].item() == eos
            assert raw.provenance[row, first_miss].item() == Provenance.AUTOCORRECTED
    with pytest.raises(ValueError, match="greedy"):
        generate(model, *args, tau=None, eos_token_id=eos, autocorrect=False, do_sample=True)


def test_rerank_is_the_lm_heads_argmax_among_the_heads_top_k_spellings(table):
    decoder = CharDecoder(table, tau=None)
    g = torch.Generator().manual_seed(0)
    rows, width = 64, 12
    logits = torch.randn(rows, table.k, len(table.charset), generator=g) * 3
    hidden = torch.randn(rows, width, generator=g)
    lm_head = torch.nn.Linear(width, table.vocab_size)
    torch.nn.init.normal_(lm_head.bias, std=1.0, generator=g)
    scores = decoder.spelling_scores(torch.log_softmax(logits, -1))
    token_logits = lm_head(hidden)
    for k in (1, 5, 40):
        chosen = decoder.rerank(logits, hidden, lm_head, k)
        for row in range(rows):
            candidates = decoder.valid_ids[scores[row].argsort(descending=True)[:k]]
            assert chosen[row].item() == candidates[token_logits[row, candidates].argmax()].item()
    assert torch.equal(decoder.rerank(logits, hidden, lm_head, 1), decoder.autocorrect(logits))
    # candidates come in descending order of score: the first K of a longer list are the top K
    many = decoder.rerank_candidates(scores, hidden, lm_head, 40)
    assert (many.scores[:, :-1] >= many.scores[:, 1:]).all()
    assert torch.equal(decoder.valid_ids[many.columns], many.ids)
    for k in (1, 5):
        assert torch.equal(best_candidate(many.ids[:, :k], many.logits[:, :k]), decoder.rerank(logits, hidden, lm_head, k))
    # every valid spelling a candidate: the LM head's greedy choice among the tokens the heads can name
    everything = decoder.rerank(logits, hidden, lm_head, len(decoder.valid_ids) + 10)
    assert torch.equal(everything, token_logits.masked_fill(~table.canonical, float("-inf")).argmax(-1))


def test_the_reranked_distribution_shares_the_candidates_mass_by_the_lm_head(table):
    """propose_and_score with rerank_k against a brute force over the vocabulary: the heads' tempered
    probability of their top-K spellings, split among them by the LM head's softmax over them, the
    rest unchanged; a distribution over the valid tokens whose argmax is rerank's token, a token
    scored as its spelling's canonical token, an unspellable one -inf; K = 1 is the heads' own."""
    decoder = CharDecoder(table, tau=None, temperature=1.7)
    g = torch.Generator().manual_seed(1)
    rows, width, vocab = 3, 12, table.vocab_size
    logits = torch.randn(rows, table.k, len(table.charset), generator=g) * 3
    copies = (table.spellable & ~table.canonical).nonzero().squeeze(1)  # tokens of another token's spelling
    logits[0].scatter_(1, table.chars[copies[0]].unsqueeze(-1), 40.0)  # row 0's candidates hold its spelling
    hidden = torch.randn(rows, width, generator=g)
    lm_head = torch.nn.Linear(width, vocab)
    torch.nn.init.normal_(lm_head.bias, std=1.0, generator=g)
    every = torch.arange(vocab).repeat(rows)
    spread = (logits.repeat_interleave(vocab, 0), every, 7, hidden.repeat_interleave(vocab, 0), lm_head)
    proposal, log_probs = decoder.propose_and_score(*spread)
    log_probs = log_probs.view(rows, vocab)
    scores = decoder.spelling_scores(torch.log_softmax(logits, -1))  # [rows, valid]
    heads = torch.log_softmax(scores / 1.7, -1)
    token_logits = lm_head(hidden)
    valid = decoder.valid_ids
    whole = log_probs[:, valid] + table.shared_by[valid].float().log()  # each spelling's, its tokens' together
    for row in range(rows):
        top = scores[row].argsort(descending=True)[:7]
        candidates = valid[top]
        expected = heads[row].clone()
        expected[top] = heads[row, top].logsumexp(0) + torch.log_softmax(token_logits[row, candidates], 0)
        assert torch.allclose(whole[row], expected, atol=1e-5)
        assert (row > 0) or table.lookup(table.chars[copies[0]]) in candidates
        assert whole[row].logsumexp(0).item() == pytest.approx(0.0, abs=1e-5)
        assert log_probs[row].logsumexp(0).item() == pytest.approx(0.0, abs=1e-5)
        best = candidates[token_logits[row, candidates].argmax()]
        assert valid[whole[row].argmax()] == best
    assert torch.equal(proposal.token_ids.view(rows, vocab)[:, 0], decoder.rerank(logits, hidden, lm_head, 7))
    canonical = table.lookup(table.chars[copies])
    assert torch.equal(log_probs[:, copies], log_probs[:, canonical])
    assert torch.isinf(log_probs[:, ~table.spellable]).all()
    # K = 1: the one candidate holds the heads' own probability
    single = decoder.propose_and_score(*spread[:2], 1, *spread[3:])[1]
    assert torch.allclose(single, decoder.propose_and_score(*spread[:2])[1], atol=1e-5)


def test_rerank_is_greedy_and_repairs_every_row(model):
    ids = torch.tensor([[5, 17, 42, 9]])
    for refused in ({"do_sample": True}, {"autocorrect": False, "eos_token_id": 0}):
        with pytest.raises(ValueError, match="re-ranking"):
            generate(model, ids, max_new_tokens=2, rerank_k=4, **refused)
    # tau 0: the LM head decides every row, so re-ranking never runs
    everywhere = generate(model, ids, max_new_tokens=6, tau=0.0, eos_token_id=None, rerank_k=4)
    assert torch.equal(everywhere.sequences, generate(model, ids, max_new_tokens=6, tau=0.0, eos_token_id=None).sequences)
    assert (everywhere.provenance == Provenance.FALLBACK).all()


@pytest.mark.parametrize("count", [0, 1, 2, 3, 5, 7, 8])
def test_the_lm_head_of_some_rows_is_theirs_whatever_the_padding(count):
    from spellm_ds.hf.char_decoding import lm_head_logits, lm_head_logits_of_rows

    torch.manual_seed(0)
    lm_head = torch.nn.Linear(16, 50)
    hidden = torch.randn(8, 16)
    rows = torch.randperm(8)[:count]
    got = lm_head_logits_of_rows(lm_head, hidden, rows)
    assert got.shape == (count, 50)
    assert torch.allclose(got, lm_head_logits(lm_head, hidden)[rows], atol=1e-6)


def test_the_shortlist_is_the_most_frequent_spellings(table):
    """frequent_spellings: a spelling counts every token spelled that way, the canonical token stands
    for it, most frequent first (ties by id), spellings never counted left out."""
    g = torch.Generator().manual_seed(3)
    counts = torch.randint(0, 4, (table.vocab_size,), generator=g)
    totals = {}
    for v in table.spellable.nonzero().squeeze(1).tolist():
        canonical = int(table.lookup(table.chars[v]))
        totals[canonical] = totals.get(canonical, 0) + int(counts[v])
    expected = [v for v, total in sorted(totals.items(), key=lambda item: (-item[1], item[0])) if total > 0]
    assert frequent_spellings(table, counts, 40).tolist() == expected[:40]
    assert frequent_spellings(table, counts, 10**6).tolist() == expected
    with pytest.raises(ValueError, match="canonical"):
        CharDecoder(table, shortlist=(table.spellable & ~table.canonical).nonzero()[:1, 0])


@pytest.mark.parametrize("rerank_k", [0, 3])
def test_a_shortlist_joins_the_candidates_once_and_shares_their_mass(table, rerank_k):
    """Against a brute force per row: the candidates are the shortlist plus the token of the heads'
    argmax string where it spells one (rerank_k 0: no AutoCorrect) or the heads' best rerank_k
    spellings outside it; greedy emits the LM head's best of
    them; the distribution gives the candidates the heads' mass of them, split by the LM head's
    softmax, each spelling once, the rest the heads' own; scoring and sampling read the same one."""
    g = torch.Generator().manual_seed(4)
    rows, width, vocab = 6, 12, table.vocab_size
    counts = torch.randint(0, 3, (vocab,), generator=g)
    shortlist = frequent_spellings(table, counts, 15)
    decoder = CharDecoder(table, tau=None, temperature=1.3, shortlist=shortlist)
    plain = CharDecoder(table, tau=None, temperature=1.3)
    logits = torch.randn(rows, table.k, len(table.charset), generator=g) * 3
    logits[0].scatter_(1, table.chars[shortlist[2]].unsqueeze(-1), 40.0)  # row 0 spells a shortlist token
    hidden = torch.randn(rows, width, generator=g)
    lm_head = torch.nn.Linear(width, vocab)
    torch.nn.init.normal_(lm_head.bias, std=1.0, generator=g)
    scores = plain.spelling_scores(torch.log_softmax(logits, -1))
    heads = torch.log_softmax(scores / 1.3, -1)
    own = table.lookup(read_string(logits))
    assert own[0] == shortlist[2] and (own < 0).any()  # row 0 spells a shortlist token; some rows spell none
    token_logits = lm_head(hidden).detach()
    valid = decoder.valid_ids
    every = torch.arange(vocab).repeat(rows)
    proposal, log_probs = decoder.propose_and_score(logits.repeat_interleave(vocab, 0), every, rerank_k,
                                                    hidden.repeat_interleave(vocab, 0), lm_head)
    log_probs = log_probs.view(rows, vocab).detach()
    mixture, mixed_proposal, _ = decoder.mixture_log_probs(logits, hidden, lm_head, rerank_k)
    assert torch.allclose(mixture.detach(), log_probs, atol=1e-5)  # scoring and sampling: one distribution
    chosen = decoder.rerank(logits, hidden, lm_head, rerank_k)
    assert torch.equal(mixed_proposal.token_ids, chosen)
    assert torch.equal(proposal.token_ids.view(rows, vocab)[:, 0], chosen)
    whole = log_probs[:, valid] + table.shared_by[valid].float().log()
    for row in range(rows):
        columns = [int(c) for c in torch.searchsorted(valid, shortlist)]
        if rerank_k:
            outside = [c for c in scores[row].argsort(descending=True).tolist() if c not in columns]
            columns += outside[:rerank_k]
        elif own[row] >= 0 and int(torch.searchsorted(valid, own[row])) not in columns:
            columns.append(int(torch.searchsorted(valid, own[row])))
        candidates = valid[columns]
        assert chosen[row] == candidates[token_logits[row, candidates].argmax()]
        expected = heads[row].clone()
        expected[columns] = heads[row, columns].logsumexp(0) + torch.log_softmax(token_logits[row, candidates], 0)
        assert torch.allclose(whole[row], expected, atol=1e-5)
        assert whole[row].logsumexp(0).item() == pytest.approx(0.0, abs=1e-5)
    assert len(set(shortlist.tolist()) | {int(own[0])}) == len(shortlist)  # row 0: its own token counted once
