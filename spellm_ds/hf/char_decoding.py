"""SpeLLM's output head at inference: k characters -> a token, AutoCorrect, fallback, re-ranking.

Everything here is batched on the model's device. Per decode step:

1. each head's argmax char, ended at the first END -> a k-char string -> token id by the spelling
   table's hash lookup;
2. **AutoCorrect** for strings that are no token's spelling: the valid token whose spelling has
   the highest summed per-head log-probability (over its characters up to its first END), an
   argmax over the vocabulary under the factorised heads (gathers from pairs of heads over the
   table of valid spellings: O(N k / 2), against the LM head's O(V d));
3. **fallback** to the original LM head, for rows whose mean per-head entropy is at or above
   ``tau`` (paper: 0.22; ``None`` disables it) or whose prediction holds an UNK character;
4. optionally (``rerank_k``, beyond the paper) **re-ranking**: on the rows the heads decide, the
   LM head scores only the ``rerank_k`` valid spellings the heads score highest, and the best of
   them is emitted. It reads ``rerank_k`` of the LM head's V rows (O(rerank_k d)), so the heads
   still choose what can be said and the teacher's own logits order it; it replaces steps 1-2.
5. optionally (a ``shortlist``, beyond the paper) the candidates the LM head scores also hold the U
   tokens most frequent in the text the heads trained on (:func:`frequent_spellings`): beside them,
   the heads' argmax string's token where it spells one (step 1; a string that spells none adds
   nothing, so no AutoCorrect pass runs), or with ``rerank_k`` the heads' best ``rerank_k``
   spellings outside the shortlist. Frequent tokens are known before any head trains, and the
   heads still miss many of them; U rows of the LM head cost O(U d) per row.

The char heads also define a proper token distribution, used for sampling and for scoring: with
``s(v) = sum_j log p_j(spelling(v)_j)`` over j up to v's first END, a valid spelling has
``log p = s / T - logsumexp_u s(u) / T`` over the valid spellings u, shared evenly by the tokens
spelled that way (``é``/``e``, or long tokens with the same first k characters). The spelling
temperature ``T`` (1 as trained, fitted at export) only spreads the distribution: argmax,
AutoCorrect and the fallback rule do not depend on it. :func:`mixture_log_probs` gives the
distribution decoding samples from and scoring reads: the heads' where they decide, the LM
head's where the row falls back. With re-ranking or a shortlist, the candidates share the heads'
probability of them by the LM head's softmax over them. (Its argmax is the greedy token without a
shortlist; with one, a spelling outside the candidates can hold more than the best candidate gets,
so greedy decoding emits the best candidate and ``generate()`` raises it to the top of the row.)

Torch and transformers only: this file is copied into every exported model (``trust_remote_code``),
and the package decodes with the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from enum import IntEnum
from typing import NamedTuple

import torch

END_ID = 0
"""The char id after a token's last character (and padding up to k)."""
UNK_ID = 1
"""The char id of a character outside the charset: a string holding it names no token."""
MAX_K = 64
"""Keeps the spelling hash (k <= 2**6 products of a char id < 2**8 and a weight < 2**46) inside int64."""
DEFAULT_TAU = 0.22
"""The paper's fallback threshold: a mean per-head entropy (nats) at or above it goes to the LM head."""


def after_first_end(chars: torch.Tensor) -> torch.Tensor:
    """``[..., k]`` bool: the positions after a string's first END. A string ends at its first END,
    so these characters carry no information (``'a<end>b'`` names the same token as ``'a'``)."""
    is_end = (chars == END_ID).long()
    return (is_end.cumsum(-1) - is_end) > 0


def read_string(char_logits: torch.Tensor) -> torch.Tensor:
    """The string the heads name, ``[..., k, C]`` -> ``[..., k]``: each head's argmax, ended at the
    first END (END after it)."""
    predicted = char_logits.argmax(-1)
    return predicted.masked_fill(after_first_end(predicted), END_ID)


def mean_head_entropy(char_logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats, fp32) of the heads the predicted string reads, up to and including its
    first END: ``[..., k, C]`` -> ``[...]``. Heads past the END name nothing, so their (possibly
    untrained) uncertainty does not count."""
    logp = torch.log_softmax(char_logits.float(), -1)
    read = (~after_first_end(char_logits.argmax(-1))).float()
    return -((logp.exp() * logp).sum(-1) * read).sum(-1) / read.sum(-1)


def falls_back(entropy: torch.Tensor, predicted: torch.Tensor, tau: float | None) -> torch.Tensor:
    """The fallback rule: rows whose mean per-head entropy is at or above ``tau``, or whose argmax
    string ``predicted`` (``[..., k]``) holds an UNK char, go to the LM head (``tau`` None: never)."""
    if tau is None:
        return torch.zeros_like(entropy, dtype=torch.bool)
    return (entropy >= tau) | (predicted == UNK_ID).any(-1)


def _hash_weights(k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 2**46, (k,), generator=generator, dtype=torch.int64)


@dataclass
class Spellings:
    """``chars[v]`` is token v's spelling as k char ids; ``lookup`` maps spellings back to ids.

    All tensors live on one device (``to``); lookup is a hash, a ``searchsorted`` and a gather,
    with no Python loop over rows. Built from the per-token spellings alone (:meth:`from_chars`),
    so an exported model carries them as buffers and needs no tokenizer to decode.
    """

    k: int
    num_chars: int  # the charset's size |C|
    chars: torch.Tensor  # [V, k] int64 char ids, END-padded (all END when unspellable)
    lengths: torch.Tensor  # [V] int64 normalised text length (0 when unspellable)
    spellable: torch.Tensor  # [V] bool
    canonical: torch.Tensor  # [V] bool: the token lookup returns for its spelling
    shared_by: torch.Tensor  # [V] int64: how many spellable tokens have this token's spelling (1 if none)
    hash_weights: torch.Tensor  # [k] int64
    keys: torch.Tensor  # [N] int64 sorted hashes of the canonical spellings
    key_token_ids: torch.Tensor  # [N] int64 token id of each key

    @classmethod
    def from_chars(cls, num_chars: int, chars: torch.Tensor, lengths: torch.Tensor, **extra) -> Spellings:
        """The table of per-token spellings ``chars`` ``[V, k]`` and text lengths ``[V]`` (0: unspellable).
        The canonical token of a spelling is the one that fits in k characters if any, then the lowest id."""
        k = chars.shape[1]
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k={k} is out of range; choose 1 <= k <= {MAX_K} (the paper uses 10)")
        chars, lengths = chars.long().cpu(), lengths.long().cpu()
        spellable = lengths > 0
        canonical = torch.zeros_like(spellable)
        shared_by = torch.ones_like(lengths)
        candidates = spellable.nonzero().squeeze(1)
        if len(candidates):
            # sort by (fits first, then id) and keep the first occurrence of each spelling
            order = candidates[torch.argsort((lengths[candidates] > k).long() * len(spellable) + candidates,
                                             stable=True)]
            _, inverse, counts = torch.unique(chars[order], dim=0, return_inverse=True, return_counts=True)
            first = torch.full((len(counts),), len(order), dtype=torch.int64)
            first.scatter_reduce_(0, inverse, torch.arange(len(order)), reduce="amin")
            canonical[order[first]] = True
            shared_by[order] = counts[inverse]
        token_ids = canonical.nonzero().squeeze(1)
        for seed in range(8):
            weights = _hash_weights(k, seed)
            hashes = (chars[token_ids] * weights).sum(-1)
            keys, order = torch.sort(hashes)
            if len(keys) < 2 or bool((keys[1:] != keys[:-1]).all()):
                return cls(k=k, num_chars=num_chars, chars=chars, lengths=lengths, spellable=spellable,
                           canonical=canonical, shared_by=shared_by, hash_weights=weights, keys=keys,
                           key_token_ids=token_ids[order], **extra)
        raise RuntimeError("could not build a collision-free spelling hash; report this as a bug")

    @property
    def vocab_size(self) -> int:
        return self.chars.shape[0]

    @property
    def truncated(self) -> torch.Tensor:
        """Spellable tokens longer than k: only their first k characters can be predicted."""
        return self.spellable & (self.lengths > self.k)

    @property
    def exact(self) -> torch.Tensor:
        """Tokens a prediction can name exactly: spellable, fit in k, and canonical."""
        return self.canonical & (self.lengths <= self.k)

    def to(self, device: torch.device | str):
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def lookup(self, chars: torch.Tensor) -> torch.Tensor:
        """Token ids for predicted spellings ``[..., k]``; -1 where no token has that spelling."""
        hashes = (chars.long() * self.hash_weights).sum(-1)
        pos = torch.searchsorted(self.keys, hashes).clamp_(max=len(self.keys) - 1)
        candidate = self.key_token_ids[pos]
        hit = (self.chars[candidate] == chars).all(-1)
        return torch.where(hit, candidate, torch.full_like(candidate, -1))


class Provenance(IntEnum):
    EXACT = 0  # the predicted string is a token's spelling
    AUTOCORRECTED = 1  # repaired to the most likely valid spelling
    FALLBACK = 2  # the original LM head decided
    RERANKED = 3  # re-ranking (rerank_k) emitted a token that is not the heads' argmax string


class Candidates(NamedTuple):
    """A row's re-ranking candidates, ``[B, K]`` each: the shortlist's (if any), then the heads'
    best outside it in descending order of spelling score. A candidate that repeats a shortlist
    spelling (the heads' own token can, and stands so where their string spells none) has score
    and logit -inf, so each spelling counts once."""

    columns: torch.Tensor  # their columns among the valid spellings
    ids: torch.Tensor  # their token ids
    scores: torch.Tensor | None  # their spelling scores (None where the caller gave none)
    logits: torch.Tensor  # their LM-head logits (fp32)


class Proposal(NamedTuple):
    token_ids: torch.Tensor  # [B] from the char heads (exact hit or AutoCorrect)
    hit: torch.Tensor  # [B] bool: the argmax string was a valid spelling
    fallback: torch.Tensor  # [B] bool: the LM head should decide this row
    entropy: torch.Tensor  # [B] mean per-head entropy, fp32


def log_normaliser(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logsumexp_u s(u) / T`` over the last dimension: ``[N, V_valid]`` scores of every valid
    spelling (or of a subset of them) -> ``[N]``."""
    return torch.logsumexp(scores / temperature, -1)


def tempered_log_probs(read: torch.Tensor, normaliser: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log p_T(v) = s(v) / T - logsumexp_u s(u) / T``: ``[N]`` read scores of the tokens asked
    for and their rows' :func:`log_normaliser` -> ``[N]``."""
    return read / temperature - normaliser


def frequent_spellings(table: Spellings, counts: torch.Tensor, size: int) -> torch.Tensor:
    """The shortlist: the canonical tokens of the ``size`` valid spellings most frequent by ``counts``
    ``[V]`` (a spelling counts every token spelled that way), most frequent first, ties by id;
    spellings never counted are left out."""
    spelled = table.spellable.nonzero().squeeze(1)
    totals = torch.zeros(table.vocab_size, dtype=torch.float64, device=spelled.device)
    totals.index_add_(0, table.lookup(table.chars[spelled]), counts.to(spelled.device)[spelled].double())
    order = totals.argsort(descending=True, stable=True)[:size]
    return order[totals[order] > 0]


def best_candidate(candidates: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per row, the candidate id ``[B, K]`` whose LM-head logit ``[B, K]`` is highest: ``[B]``."""
    return candidates.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)


def looked_up(proposal: Proposal) -> torch.Tensor:
    """The token of each row's argmax string, -1 where it spells none (before AutoCorrect)."""
    return torch.where(proposal.hit, proposal.token_ids, -1)


def provenance(proposal: Proposal) -> torch.Tensor:
    """Per-row :class:`Provenance` codes."""
    codes = torch.where(proposal.hit, int(Provenance.EXACT), int(Provenance.AUTOCORRECTED))
    return torch.where(proposal.fallback, int(Provenance.FALLBACK), codes)


def lm_head_logits(lm_head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's logits in fp32 (with its bias if it has one)."""
    return torch.nn.functional.linear(hidden, lm_head.weight, lm_head.bias).float()


def lm_head_logits_of_rows(lm_head: torch.nn.Module, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """:func:`lm_head_logits` of ``hidden[rows]``, the rows padded (with copies of the first) to a
    power of two of at least 4, or to the whole batch: BLAS computes a matmul of 2-3 rows row by row.
    Measured on a 2-core EPYC (fp32, one thread), SmolLM2's LM head took 11.6 ms for 1 row, 23.4 for
    2, 34.6 for 3, 21.3 for 4 and 26.0 for 8; an Intel Xeon took longer for 2, 3, 6 or 7 of 8 rows
    than for all 8. So a fallback step never costs more than the LM head on the whole batch."""
    count = len(rows)
    padded = count if count <= 1 else 1 << max(2, (count - 1).bit_length())
    if padded >= len(hidden):
        return lm_head_logits(lm_head, hidden)[rows]
    if padded > count:
        rows = torch.cat([rows, rows[:1].expand(padded - count)])
    return lm_head_logits(lm_head, hidden[rows])[:count]


class CharDecoder:
    """Maps char logits to tokens; holds the valid spellings on the model's device, and the
    ``shortlist`` (canonical token ids, :func:`frequent_spellings`) if any."""

    def __init__(self, table: Spellings, tau: float | None = DEFAULT_TAU, temperature: float = 1.0,
                 shortlist: torch.Tensor | None = None) -> None:
        if not temperature > 0:
            raise ValueError(f"spelling temperature {temperature} must be > 0")
        self.table = table
        self.tau = tau
        self.temperature = temperature
        self.valid_ids = table.canonical.nonzero().squeeze(1)  # [N]
        self.shortlist_columns = None  # [U] the shortlist's columns among the valid spellings
        if shortlist is not None:
            if not len(shortlist) or not bool(table.canonical[shortlist].all()):
                raise ValueError("a shortlist holds canonical token ids (frequent_spellings), at least one")
            self.shortlist_columns = torch.searchsorted(self.valid_ids, shortlist.to(self.valid_ids.device))
            self.on_shortlist = torch.zeros(len(self.valid_ids), dtype=torch.bool,  # [N]
                                            device=self.valid_ids.device).index_fill_(0, self.shortlist_columns, True)
        self._shortlist_rows: tuple | None = None
        valid_chars = table.chars[self.valid_ids]  # [N, k]
        # valid spellings with the characters after their first END pointing at an extra zero
        # log-prob column (index C): a spelling scores only the characters it reads
        width = table.num_chars + 1
        scored = valid_chars.masked_fill(after_first_end(valid_chars), width - 1)
        if table.k % 2:  # an odd head out pairs with a phantom head that reads nothing
            scored = torch.nn.functional.pad(scored, (0, 1), value=width - 1)
        # heads 2p and 2p+1 read together: one index into their [(C + 1)^2] table of summed log-probs
        self.scored_pairs = (scored[:, 0::2] * width + scored[:, 1::2]).t().contiguous()  # [ceil(k / 2), N]
        # log of the share of a spelling's probability each token spelled that way gets
        self.log_share = -table.shared_by.double().log().float()  # [V]

    def to(self, device: torch.device | str) -> CharDecoder:
        moved = CharDecoder.__new__(CharDecoder)
        moved.table, moved.tau, moved.temperature = self.table.to(device), self.tau, self.temperature
        moved.valid_ids, moved.scored_pairs = self.valid_ids.to(device), self.scored_pairs.to(device)
        moved.log_share = self.log_share.to(device)
        moved.shortlist_columns, moved._shortlist_rows = None, None
        if self.shortlist_columns is not None:
            moved.shortlist_columns = self.shortlist_columns.to(device)
            moved.on_shortlist = self.on_shortlist.to(device)
        return moved

    def reranks(self, rerank_k: int) -> bool:
        """Whether the LM head picks among candidates on the rows the heads decide: with ``rerank_k``
        or a shortlist."""
        return bool(rerank_k) or self.shortlist_columns is not None

    def spelling_scores(self, char_logp: torch.Tensor) -> torch.Tensor:
        """Summed per-head log-prob of every valid spelling, over its characters up to its first
        END: ``[B, k, C]`` -> ``[B, N]``.

        Heads are read in pairs: the ``[B, (C + 1)^2]`` sums of two heads' log-probs are cheap to
        build, and one ``index_select`` into them replaces two, so a row costs B x N reads k / 2
        times (2-3x faster on CPU than one gather per head) and no ``[B, k, N]`` index is built.
        """
        padded = torch.nn.functional.pad(char_logp, (0, 1))  # [B, k, C + 1], the last column 0
        if len(self.scored_pairs) * 2 > padded.shape[1]:
            padded = torch.nn.functional.pad(padded, (0, 0, 0, 1))  # the phantom head: all zeros
        scores = None
        for p, pair in enumerate(self.scored_pairs):
            sums = (padded[:, 2 * p, :, None] + padded[:, 2 * p + 1, None, :]).flatten(1)  # [B, (C + 1)^2]
            part = sums.index_select(1, pair)
            scores = part if scores is None else scores + part
        return scores

    def read_scores(self, char_logp: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Summed per-head log-prob of each token's spelling up to its first END, ``s(v)``:
        ``[N, k, C]`` log-probs and ``[N]`` token ids -> ``[N]``; any spellable token, not only
        canonical ones (a long token is read by its first k characters)."""
        chars = self.table.chars[token_ids]
        return char_logp.gather(-1, chars.unsqueeze(-1)).squeeze(-1).masked_fill(after_first_end(chars), 0.0).sum(-1)

    def token_log_probs(self, char_logits: torch.Tensor) -> torch.Tensor:
        """The char heads' token distribution over the full vocabulary ``[B, V]`` (fp32; -inf
        for tokens no prediction can name)."""
        return self.spread(torch.log_softmax(self.spelling_scores(torch.log_softmax(char_logits.float(), -1))
                                             / self.temperature, -1))

    def spread(self, spelling_log_probs: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` log-probs of the valid spellings -> ``[B, V]`` log-probs of the tokens: each
        spelling's probability shared evenly by the tokens spelled that way; -inf where none."""
        per_token = spelling_log_probs[:, self._spelling_index()]
        return (per_token + self.log_share).masked_fill(~self.table.spellable, float("-inf"))

    def _spelling_index(self) -> torch.Tensor:
        """``[V]``: each token's column among the valid spellings (0 for unspellable tokens)."""
        if not hasattr(self, "_index"):
            canonical = self.table.lookup(self.table.chars).clamp(min=0)
            column = torch.zeros(self.table.vocab_size, dtype=torch.long, device=canonical.device)
            column[self.valid_ids] = torch.arange(len(self.valid_ids), device=canonical.device)
            self._index = column[canonical]
        return self._index

    def spelling_log_probs(self, char_logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """log-prob of each token under the char heads' token distribution: ``[N, k, C]`` logits
        and ``[N]`` token ids -> ``[N]`` (fp32). A token gets its share of its spelling's
        probability (a long token is named by its first k characters); unspellable tokens -inf."""
        char_logp = torch.log_softmax(char_logits.float(), -1)
        normaliser = log_normaliser(self.spelling_scores(char_logp), self.temperature)
        return self._log_probs_of(char_logp, normaliser, token_ids)

    def _log_probs_of(self, char_logp: torch.Tensor, normaliser: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        log_probs = tempered_log_probs(self.read_scores(char_logp, token_ids), normaliser, self.temperature)
        return (log_probs + self.log_share[token_ids]).masked_fill(~self.table.spellable[token_ids], float("-inf"))

    def autocorrect(self, char_logits: torch.Tensor) -> torch.Tensor:
        """The valid token with the highest summed per-head log-probability, per row."""
        scores = self.spelling_scores(torch.log_softmax(char_logits.float(), -1))
        return self.valid_ids[scores.argmax(-1)]

    def rerank(self, char_logits: torch.Tensor, hidden: torch.Tensor, lm_head: torch.nn.Module,
               rerank_k: int, own: torch.Tensor | None = None) -> torch.Tensor:
        """Per row, of the candidates (:meth:`rerank_candidates`) the one the LM head scores highest
        (fp32): ``[B, k, C]`` char logits and ``[B, d]`` hidden states -> ``[B]`` token ids. The
        logits come from gathered rows of ``lm_head``, not all V. ``own``: the heads' argmax
        strings' tokens (-1: none), which a shortlist without ``rerank_k`` adds (looked up here
        when not given)."""
        scores = self.spelling_scores(torch.log_softmax(char_logits.float(), -1)) if rerank_k else None
        if own is None and not rerank_k:
            own = self.table.lookup(read_string(char_logits))
        found = self.rerank_candidates(scores, hidden, lm_head, rerank_k, own)
        return best_candidate(found.ids, found.logits)

    def rerank_candidates(self, scores: torch.Tensor | None, hidden: torch.Tensor, lm_head: torch.nn.Module,
                          rerank_k: int, own: torch.Tensor | None = None) -> Candidates:
        """Per row, the candidates and their LM-head logits (fp32, with the head's bias if it has one):
        the shortlist's tokens, if any, then the ``rerank_k`` valid spellings outside it the heads
        score highest (``scores``, :meth:`spelling_scores`); with a shortlist and no ``rerank_k``,
        the token ``own`` ``[B]`` of the heads' argmax string instead, counted only where there is
        one (-1: none) and the shortlist does not hold it (``scores`` may then be None)."""
        shortlist = self.shortlist_columns
        if rerank_k:
            outside = scores if shortlist is None else scores.index_fill(1, shortlist, float("-inf"))
            room = scores.shape[1] - (0 if shortlist is None else len(shortlist))
            columns = outside.topk(min(rerank_k, room), -1).indices
        else:
            # no token (-1) stands as a repeat of a shortlist spelling: both are then scored -inf
            columns = torch.where(own < 0, shortlist[0], self._spelling_index()[own.clamp(min=0)]).unsqueeze(1)
        ids = self.valid_ids[columns]
        logits = (lm_head.weight[ids].float() @ hidden.float().unsqueeze(-1)).squeeze(-1)
        if lm_head.bias is not None:
            logits = logits + lm_head.bias[ids].float()
        chosen = None if scores is None else scores.gather(1, columns)
        if shortlist is not None:
            if not rerank_k:
                repeated = self.on_shortlist[columns]
                logits = logits.masked_fill(repeated, float("-inf"))
                chosen = None if chosen is None else chosen.masked_fill(repeated, float("-inf"))
            weight, bias = self.shortlist_rows(lm_head)
            columns = torch.cat([shortlist.expand(len(hidden), -1), columns], 1)
            ids = self.valid_ids[columns]
            logits = torch.cat([torch.addmm(bias, hidden.float(), weight.t()), logits], 1)
            chosen = None if chosen is None else torch.cat([scores.index_select(1, shortlist), chosen], 1)
        return Candidates(columns, ids, chosen, logits)

    def shortlist_rows(self, lm_head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The shortlist's LM-head rows and biases in fp32 (zeros without a bias), gathered once per
        head and kept while its weights are unchanged: the shortlist is the same on every row."""
        weight = lm_head.weight
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype)
        if self._shortlist_rows is None or self._shortlist_rows[0] != key:
            ids = self.valid_ids[self.shortlist_columns]
            bias = torch.zeros(len(ids), device=weight.device) if lm_head.bias is None else lm_head.bias[ids].float()
            self._shortlist_rows = (key, weight[ids].detach().float(), bias.detach())
        return self._shortlist_rows[1:]

    def propose(self, char_logits: torch.Tensor, autocorrect: bool = True) -> Proposal:
        """Tokens from char logits ``[B, k, C]`` and which rows should fall back; no host sync.

        With ``autocorrect=False`` missed rows keep -1: the decode loop then repairs only the rows
        it knows (after its one host transfer per token) to have missed, since AutoCorrect over the
        whole vocabulary costs more than the rest of the char path together.
        """
        scores = self.spelling_scores(torch.log_softmax(char_logits.float(), -1)) if autocorrect else None
        return self.proposal_from(char_logits, scores)

    def propose_and_score(self, char_logits: torch.Tensor, token_ids: torch.Tensor, rerank_k: int = 0,
                          hidden: torch.Tensor | None = None,
                          lm_head: torch.nn.Module | None = None) -> tuple[Proposal, torch.Tensor]:
        """:meth:`propose` (with AutoCorrect) and :meth:`spelling_log_probs` of ``token_ids`` from one
        pass over the valid spellings, the costly part of both (scoring a position reads both).

        With ``rerank_k`` or a shortlist (and the rows' ``hidden`` states and the ``lm_head``) the
        proposal's tokens are :meth:`rerank`'s, and the log-probs are those of the re-ranked
        distribution: the heads' probability of the candidates, shared among them by the LM head's
        softmax over them, every other spelling keeping the heads' probability (and a token, as
        ever, its share of its spelling's). Without a shortlist its argmax over the valid spellings
        is :meth:`rerank`'s token (the best candidate holds at least 1 / ``rerank_k`` of their mass,
        no other spelling more than the least of them), so scores and greedy decoding agree.
        """
        char_logp = torch.log_softmax(char_logits.float(), -1)
        scores = self.spelling_scores(char_logp)
        normaliser = log_normaliser(scores, self.temperature)
        proposal = self.proposal_from(char_logits, scores)
        log_probs = self._log_probs_of(char_logp, normaliser, token_ids)
        if not self.reranks(rerank_k):
            return proposal, log_probs
        found = self.rerank_candidates(scores, hidden, lm_head, rerank_k, looked_up(proposal))
        set_logp = log_normaliser(found.scores, self.temperature) - normaliser
        # a token is scored as its spelling, i.e. as the canonical token of that spelling
        member = found.ids == self.table.lookup(self.table.chars[token_ids]).unsqueeze(-1)  # [B, rerank_k]
        within = torch.log_softmax(found.logits, -1).masked_fill(~member, float("-inf")).logsumexp(-1)
        in_set = member.any(-1) & self.table.spellable[token_ids]
        return (proposal._replace(token_ids=best_candidate(found.ids, found.logits)),
                torch.where(in_set, set_logp + within + self.log_share[token_ids], log_probs))

    def proposal_from(self, char_logits: torch.Tensor, scores: torch.Tensor | None) -> Proposal:
        """:meth:`propose` from spelling ``scores`` a caller already has (:meth:`spelling_scores` of the
        same logits; None: no AutoCorrect), so a caller that also re-ranks pays for them once."""
        predicted = read_string(char_logits)
        looked_up = self.table.lookup(predicted)
        hit = looked_up >= 0
        token_ids = looked_up if scores is None else torch.where(hit, looked_up, self.valid_ids[scores.argmax(-1)])
        entropy = mean_head_entropy(char_logits)
        return Proposal(token_ids, hit, falls_back(entropy, predicted, self.tau), entropy)

    def mixture_log_probs(self, char_logits: torch.Tensor, hidden: torch.Tensor, lm_head: torch.nn.Module,
                          rerank_k: int = 0) -> tuple[torch.Tensor, Proposal, torch.Tensor]:
        """SpeLLM's next-token distribution ``[B, V]`` (fp32 log-probs), the proposal, and the LM
        head's logits on the fallback rows (``[0, V]`` without any): the char heads' distribution
        (re-ranked with ``rerank_k`` or a shortlist, as :meth:`propose_and_score` scores it) on the rows they
        decide, the LM head's on the rows that fall back (the head runs on those rows only).
        Sampling draws from it, scoring reads it. Cost per row: the valid spellings' scores
        (O(N k / 2) gathers), a ``[V]`` row, and the LM head (O(V d)) on fallback rows."""
        char_logp = torch.log_softmax(char_logits.float(), -1)
        scores = self.spelling_scores(char_logp)
        proposal = self.proposal_from(char_logits, scores)
        normaliser = log_normaliser(scores, self.temperature).unsqueeze(1)
        spelling_logp = scores / self.temperature - normaliser  # [B, N]
        if self.reranks(rerank_k):
            found = self.rerank_candidates(scores, hidden, lm_head, rerank_k, looked_up(proposal))
            set_logp = log_normaliser(found.scores, self.temperature).unsqueeze(1) - normaliser
            # a repeated candidate (score -inf) shares its column with a shortlist one: the larger wins
            spelling_logp = spelling_logp.scatter(1, found.columns, float("-inf")).scatter_reduce(
                1, found.columns, set_logp + torch.log_softmax(found.logits, -1), reduce="amax")
            proposal = proposal._replace(token_ids=best_candidate(found.ids, found.logits))
        log_probs = self.spread(spelling_logp)
        rows = proposal.fallback.nonzero().squeeze(1)
        fallback_logits = lm_head_logits_of_rows(lm_head, hidden, rows) if len(rows) else log_probs[:0]
        log_probs[rows] = torch.log_softmax(fallback_logits, -1)
        return log_probs, proposal, fallback_logits


@torch.no_grad()
def greedy_tokens(decoder: CharDecoder, char_logits: torch.Tensor, hidden: torch.Tensor, lm_head: torch.nn.Module,
                  proposal: Proposal, fallback: torch.Tensor, hit: torch.Tensor, rerank_k: int = 0,
                  autocorrect: bool = True, eos_token_id: int | None = None,
                  fallback_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy SpeLLM decoding of one step: ``(token ids [B], Provenance codes [B])`` from a
    ``proposal`` made without AutoCorrect (:meth:`CharDecoder.propose` with ``autocorrect=False``)
    and its ``fallback`` and ``hit`` masks on the host (the caller's one device->host transfer).

    The argmax string's token where it is a valid spelling (the paper's rule); AutoCorrect on the
    missed rows only (or, with ``autocorrect=False``, ``eos_token_id``: the row ends there); with
    ``rerank_k`` or a shortlist, :meth:`CharDecoder.rerank`'s token on every decided row (EXACT where
    it is the heads' argmax string, RERANKED otherwise); the LM head's argmax on the fallback rows,
    computed for those rows alone.

    ``fallback_logits``: given where ``proposal`` and they come from :meth:`CharDecoder.mixture_log_probs`
    with the same ``rerank_k``: that proposal already holds AutoCorrect's or rerank's tokens, and
    these are its fallback rows' LM-head logits, so both are read, not computed again.
    """
    ids, origin = proposal.token_ids, provenance(proposal)
    device = ids.device
    reranks = decoder.reranks(rerank_k)
    if fallback_logits is not None:
        if reranks:
            exact = ids == decoder.table.lookup(read_string(char_logits))
            origin = torch.where(proposal.fallback | exact, origin, int(Provenance.RERANKED))
        elif not autocorrect:
            ids = torch.where(hit.to(device) | fallback.to(device), ids, eos_token_id)
    else:
        missed = (~hit & ~fallback).nonzero().squeeze(1).to(device)
        if len(missed) and not reranks:  # re-ranking repairs every row
            ids = ids.clone()
            ids[missed] = decoder.autocorrect(char_logits[missed]) if autocorrect else eos_token_id
        decided = (~fallback).nonzero().squeeze(1).to(device)
        if reranks and len(decided):
            chosen = decoder.rerank(char_logits[decided], hidden[decided], lm_head, rerank_k, own=ids[decided])
            ids, origin = ids.clone(), origin.clone()
            ids[decided] = chosen
            origin[decided] = torch.where(chosen == proposal.token_ids[decided], int(Provenance.EXACT),
                                          int(Provenance.RERANKED))
    rows = fallback.nonzero().squeeze(1).to(device)
    if len(rows):
        ids = ids.clone()
        logits = lm_head_logits_of_rows(lm_head, hidden, rows) if fallback_logits is None else fallback_logits
        ids[rows] = logits.argmax(-1)
    return ids, origin


def sampling_warpers(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """transformers' own temperature, top-k and top-p warpers, in ``generate()``'s order: the
    package's decode loop samples exactly as ``generate(do_sample=True)`` does."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def sample(log_probs: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids ``[B]`` drawn from ``[B, V]`` log-probabilities after :func:`sampling_warpers`
    (with ``generator``, or torch's global one as ``generate()`` uses)."""
    scores = sampling_warpers(temperature, top_k, top_p)(None, log_probs.float())
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)
