"""SpeLLM decoding: k predicted characters -> a token, AutoCorrect, entropy fallback, sampling.

Everything here is batched on the model's device. Per decode step:

1. each head's argmax char, ended at the first END -> a k-char string -> token id by the spelling table's hash lookup;
2. **AutoCorrect** for strings that are no token's spelling: the valid token whose spelling has
   the highest summed per-head log-probability (over its characters up to its first END), an argmax over the vocabulary under the
   factorised heads (gathers from pairs of heads over the table of valid spellings: O(N k / 2), against
   the LM head's O(V d));
3. **fallback** to the original LM head, for rows whose mean per-head entropy is at or above
   ``tau`` (paper: 0.22; ``None`` disables it) or whose prediction holds an UNK character;
4. optionally (``rerank_k``, beyond the paper) **re-ranking**: on the rows the heads decide, the
   LM head scores only the ``rerank_k`` valid spellings the heads score highest, and the best of
   them is emitted. It reads ``rerank_k`` of the LM head's V rows (O(rerank_k d)), so the heads
   still choose what can be said and the teacher's own logits order it; it replaces steps 1-2.
   Scored continuations then read the matching distribution (:meth:`CharDecoder.propose_and_score`):
   the heads' probability of those candidates, shared among them by the LM head's softmax.

Valid tokens are the canonical token of each spelling (:class:`SpellingTable`): the ones a
prediction can name. The char heads also define a proper token distribution, used for sampling and for scoring
continuations: with ``s(v) = sum_j log p_j(spelling(v)_j)`` over j up to v's first END,
``log p(v) = s(v) / T - logsumexp_u s(u) / T`` over the valid tokens u. The spelling temperature
``T`` (1 as trained; :mod:`spellm_ds.calibration` fits it after training) only spreads the
distribution: argmax, AutoCorrect and the fallback rule do not depend on it.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import NamedTuple

import torch

from spellm_ds.charset import UNK_ID
from spellm_ds.errors import SpellmError
from spellm_ds.metrics import mean_head_entropy
from spellm_ds.spelling import SpellingTable, after_first_end, read_string


class Provenance(IntEnum):
    EXACT = 0  # the predicted string is a token's spelling
    AUTOCORRECTED = 1  # repaired to the most likely valid spelling
    FALLBACK = 2  # the original LM head decided
    RERANKED = 3  # re-ranking (rerank_k) emitted a token that is not the heads' argmax string


class Proposal(NamedTuple):
    token_ids: torch.Tensor  # [B] from the char heads (exact hit or AutoCorrect)
    hit: torch.Tensor  # [B] bool: the argmax string was a valid spelling
    fallback: torch.Tensor  # [B] bool: the LM head should decide this row
    entropy: torch.Tensor  # [B] mean per-head entropy, fp32


def falls_back(entropy: torch.Tensor, predicted: torch.Tensor, tau: float | None) -> torch.Tensor:
    """The fallback rule: rows whose mean per-head entropy is at or above ``tau``, or whose argmax
    string ``predicted`` (``[..., k]``) holds an UNK char, go to the LM head (``tau`` None: never)."""
    if tau is None:
        return torch.zeros_like(entropy, dtype=torch.bool)
    return (entropy >= tau) | (predicted == UNK_ID).any(-1)


def log_normaliser(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logsumexp_u s(u) / T`` over the last dimension: ``[N, V_valid]`` scores of every valid
    spelling (or of a subset of them) -> ``[N]``."""
    return torch.logsumexp(scores / temperature, -1)


def tempered_log_probs(read: torch.Tensor, normaliser: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log p_T(v) = s(v) / T - logsumexp_u s(u) / T``: ``[N]`` read scores of the tokens asked
    for and their rows' :func:`log_normaliser` -> ``[N]``."""
    return read / temperature - normaliser


class CharDecoder:
    """Maps char logits to tokens; holds the valid spellings on the model's device."""

    def __init__(self, table: SpellingTable, tau: float | None = 0.22, temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise SpellmError(f"spelling temperature {temperature} must be > 0")
        self.table = table
        self.tau = tau
        self.temperature = temperature
        self.valid_ids = table.canonical.nonzero().squeeze(1)  # [N]
        valid_chars = table.chars[self.valid_ids]  # [N, k]
        # valid spellings with the characters after their first END pointing at an extra zero
        # log-prob column (index C): a spelling scores only the characters it reads
        width = len(table.charset) + 1
        scored = valid_chars.masked_fill(after_first_end(valid_chars), width - 1)
        if table.k % 2:  # an odd head out pairs with a phantom head that reads nothing
            scored = torch.nn.functional.pad(scored, (0, 1), value=width - 1)
        # heads 2p and 2p+1 read together: one index into their [(C + 1)^2] table of summed log-probs
        self.scored_pairs = (scored[:, 0::2] * width + scored[:, 1::2]).t().contiguous()  # [ceil(k / 2), N]

    def to(self, device: torch.device | str) -> CharDecoder:
        moved = CharDecoder.__new__(CharDecoder)
        moved.table, moved.tau, moved.temperature = self.table.to(device), self.tau, self.temperature
        moved.valid_ids, moved.scored_pairs = self.valid_ids.to(device), self.scored_pairs.to(device)
        return moved

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
        scores = self.spelling_scores(torch.log_softmax(char_logits.float(), -1))
        full = scores.new_full((scores.shape[0], self.table.vocab_size), float("-inf"))
        return full.index_copy_(1, self.valid_ids, torch.log_softmax(scores / self.temperature, -1))

    def spelling_log_probs(self, char_logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """log-prob of each token's spelling under the char heads' token distribution: ``[N, k, C]``
        logits and ``[N]`` token ids -> ``[N]`` (fp32).

        Scores any spellable token, not only canonical ones: a token shares its spelling's
        probability with the canonical token of that spelling (a long token is named by its first
        k characters). Unspellable tokens get -inf.
        """
        char_logp = torch.log_softmax(char_logits.float(), -1)
        normaliser = log_normaliser(self.spelling_scores(char_logp), self.temperature)
        return self._log_probs_of(char_logp, normaliser, token_ids)

    def _log_probs_of(self, char_logp: torch.Tensor, normaliser: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        log_probs = tempered_log_probs(self.read_scores(char_logp, token_ids), normaliser, self.temperature)
        return log_probs.masked_fill(~self.table.spellable[token_ids], float("-inf"))

    def autocorrect(self, char_logits: torch.Tensor) -> torch.Tensor:
        """The valid token with the highest summed per-head log-probability, per row."""
        scores = self.spelling_scores(torch.log_softmax(char_logits.float(), -1))
        return self.valid_ids[scores.argmax(-1)]

    def rerank(self, char_logits: torch.Tensor, hidden: torch.Tensor, lm_head: torch.nn.Linear,
               rerank_k: int) -> torch.Tensor:
        """Per row, of the ``rerank_k`` valid tokens whose spellings the heads score highest, the one
        the LM head scores highest (fp32): ``[B, k, C]`` char logits and ``[B, d]`` hidden states ->
        ``[B]`` token ids. The logits come from ``rerank_k`` gathered rows of ``lm_head``, not all V."""
        candidates, _, logits = self.rerank_candidates(
            self.spelling_scores(torch.log_softmax(char_logits.float(), -1)), hidden, lm_head, rerank_k)
        return best_candidate(candidates, logits)

    def rerank_candidates(self, scores: torch.Tensor, hidden: torch.Tensor, lm_head: torch.nn.Linear,
                          rerank_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``rerank_k`` valid tokens of highest spelling score per row (:meth:`spelling_scores`),
        ``[B, rerank_k]`` in descending order of score: their ids, their scores and their LM-head
        logits (fp32, with the head's bias if it has one)."""
        top = scores.topk(min(rerank_k, scores.shape[1]), -1)
        candidates = self.valid_ids[top.indices]
        logits = (lm_head.weight[candidates].float() @ hidden.float().unsqueeze(-1)).squeeze(-1)
        if lm_head.bias is not None:
            logits = logits + lm_head.bias[candidates].float()
        return candidates, top.values, logits

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
                          lm_head: torch.nn.Linear | None = None) -> tuple[Proposal, torch.Tensor]:
        """:meth:`propose` (with AutoCorrect) and :meth:`spelling_log_probs` of ``token_ids`` from one
        pass over the valid spellings, the costly part of both (scoring a position reads both).

        With ``rerank_k`` (and the rows' ``hidden`` states and the ``lm_head``) the proposal's
        tokens are :meth:`rerank`'s, and the log-probs are those of the re-ranked distribution: the
        heads' probability of their ``rerank_k`` candidates, shared among them by the LM head's
        softmax over them, every other spelling keeping the heads' probability. Its argmax is
        :meth:`rerank`'s token (the best candidate holds at least 1 / ``rerank_k`` of their mass,
        no other spelling more than the least of them), so scores and greedy decoding agree.
        """
        char_logp = torch.log_softmax(char_logits.float(), -1)
        scores = self.spelling_scores(char_logp)
        normaliser = log_normaliser(scores, self.temperature)
        proposal = self.proposal_from(char_logits, scores)
        log_probs = self._log_probs_of(char_logp, normaliser, token_ids)
        if not rerank_k:
            return proposal, log_probs
        candidates, candidate_scores, logits = self.rerank_candidates(scores, hidden, lm_head, rerank_k)
        set_logp = log_normaliser(candidate_scores, self.temperature) - normaliser
        # a token is scored as its spelling, i.e. as the canonical token of that spelling
        member = candidates == self.table.lookup(self.table.chars[token_ids]).unsqueeze(-1)  # [B, rerank_k]
        within = torch.log_softmax(logits, -1).masked_fill(~member, float("-inf")).logsumexp(-1)
        in_set = member.any(-1) & self.table.spellable[token_ids]
        return (proposal._replace(token_ids=best_candidate(candidates, logits)),
                torch.where(in_set, set_logp + within, log_probs))

    def proposal_from(self, char_logits: torch.Tensor, scores: torch.Tensor | None) -> Proposal:
        """:meth:`propose` from spelling ``scores`` a caller already has (:meth:`spelling_scores` of the
        same logits; None: no AutoCorrect), so a caller that also re-ranks pays for them once."""
        predicted = read_string(char_logits)
        looked_up = self.table.lookup(predicted)
        hit = looked_up >= 0
        token_ids = looked_up if scores is None else torch.where(hit, looked_up, self.valid_ids[scores.argmax(-1)])
        entropy = mean_head_entropy(char_logits)
        return Proposal(token_ids, hit, falls_back(entropy, predicted, self.tau), entropy)


def best_candidate(candidates: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per row, the candidate id ``[B, K]`` whose LM-head logit ``[B, K]`` is highest: ``[B]``."""
    return candidates.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)


def provenance(proposal: Proposal) -> torch.Tensor:
    """Per-row :class:`Provenance` codes."""
    codes = torch.where(proposal.hit, int(Provenance.EXACT), int(Provenance.AUTOCORRECTED))
    return torch.where(proposal.fallback, int(Provenance.FALLBACK), codes)


def sample(log_probs: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample token ids from ``[B, V]`` log-probabilities with temperature, top-k and top-p."""
    logits = log_probs.float() / max(temperature, 1e-6)
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class GenerationOutput(NamedTuple):
    sequences: torch.Tensor  # [B, n] generated ids (EOS-padded after a row finished)
    provenance: torch.Tensor  # [B, n] Provenance codes, -1 after a row finished

    def counts(self) -> dict[str, int]:
        return {p.name.lower(): int((self.provenance == p).sum()) for p in Provenance}


TokenPicker = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor | None]]
"""(last hidden states [B, d], finished [B]) -> (next ids [B], provenance [B]), or (None, None) to stop."""


@torch.no_grad()
def decode_loop(base, pick: TokenPicker, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                max_new_tokens: int = 64, eos_token_id: int | None = None) -> GenerationOutput:
    """Greedy-style decoding over ``base``'s decoder with a KV cache and left-padded batches;
    ``pick`` turns each step's last hidden states into tokens (the output head is its business).

    Stopping costs one device->host transfer per token (``pick`` may fold its own into it).
    """
    from transformers import DynamicCache

    decoder_stack = base.get_decoder()
    batch = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=base.config)
    step_ids = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    tokens, origins = [], []
    for _ in range(max_new_tokens):
        hidden = decoder_stack(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                               past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
        ids, origin = pick(hidden, finished)
        if ids is None:  # every row had finished
            break
        origin = torch.where(finished, -1, origin)
        if eos_token_id is not None:
            ids = torch.where(finished, eos_token_id, ids)
            finished = finished | (ids == eos_token_id)
        tokens.append(ids)
        origins.append(origin)
        step_ids = ids.unsqueeze(1)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        positions = positions[:, -1:] + 1
    empty = input_ids.new_zeros(batch, 0)
    return GenerationOutput(torch.stack(tokens, 1) if tokens else empty,
                            torch.stack(origins, 1) if origins else empty)


def lm_head_picker(base) -> TokenPicker:
    """Greedy decoding with ``base``'s own LM head (the teacher, or a SpeLLM model's fallback head
    alone): the reference the char heads are compared with."""
    lm_head = base.get_output_embeddings()

    def pick(hidden: torch.Tensor, finished: torch.Tensor):
        if finished.all():
            return None, None
        return lm_head(hidden).float().argmax(-1), torch.full_like(finished, int(Provenance.FALLBACK), dtype=torch.long)

    return pick


def spellm_picker(model, decoder: CharDecoder, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, generator: torch.Generator | None = None, autocorrect: bool = True,
                  eos_token_id: int | None = None, rerank_k: int = 0) -> TokenPicker:
    """The SpeLLM output head: char heads, lookup, AutoCorrect on missed rows only, and the LM
    head on fallback rows only.

    With ``autocorrect=False`` (greedy only) a string that is no token's spelling has no token to
    emit: the row ends there with ``eos_token_id`` (its provenance stays AUTOCORRECTED, marking
    the miss). With ``rerank_k`` (greedy only) every decided row takes :meth:`CharDecoder.rerank`'s
    token: EXACT where it is the heads' argmax string, RERANKED otherwise. Its one device->host
    transfer per token carries the fallback and hit masks and the previous step's finished flags
    (the stopping check) together.
    """
    if not autocorrect and (do_sample or eos_token_id is None):
        raise ValueError("decoding without AutoCorrect is greedy and needs an eos_token_id to end a missed row")
    if rerank_k and (do_sample or not autocorrect):
        raise ValueError("re-ranking (rerank_k > 0) is greedy decoding that repairs every row: "
                         "drop do_sample and autocorrect=False, or set rerank_k=0")
    lm_head = model.base.get_output_embeddings()

    def pick(hidden: torch.Tensor, finished: torch.Tensor):
        char_logits = model.char_heads(hidden)
        proposal = decoder.propose(char_logits, autocorrect=False)
        batch = len(hidden)
        host = torch.cat([proposal.fallback, proposal.hit, finished]).cpu()
        if host[2 * batch:].all():
            return None, None
        fallback, hit = host[:batch], host[batch : 2 * batch]
        origin = provenance(proposal)
        if do_sample:
            ids = sample(decoder.token_log_probs(char_logits), temperature, top_k, top_p, generator)
        elif rerank_k:
            ids = proposal.token_ids
            decided = (~fallback).nonzero().squeeze(1)
            if len(decided):
                decided = decided.to(ids.device)
                chosen = decoder.rerank(char_logits[decided], hidden[decided], lm_head, rerank_k)
                ids, origin = ids.clone(), origin.clone()
                ids[decided] = chosen
                origin[decided] = torch.where(chosen == proposal.token_ids[decided], int(Provenance.EXACT),
                                              int(Provenance.RERANKED))
        else:
            ids = proposal.token_ids
            missed = (~hit & ~fallback).nonzero().squeeze(1)
            if len(missed):
                missed = missed.to(ids.device)
                ids = ids.clone()
                ids[missed] = decoder.autocorrect(char_logits[missed]) if autocorrect else eos_token_id
        rows = fallback.nonzero().squeeze(1)
        if len(rows):
            rows = rows.to(ids.device)
            token_logits = lm_head(hidden[rows]).float()
            ids = ids.clone()
            ids[rows] = (sample(torch.log_softmax(token_logits, -1), temperature, top_k, top_p, generator)
                         if do_sample else token_logits.argmax(-1))
        return ids, origin

    return pick


def generate(model, decoder: CharDecoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 64, eos_token_id: int | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None, autocorrect: bool = True, rerank_k: int = 0) -> GenerationOutput:
    """Decode with the char heads (see :func:`spellm_picker`) over a KV cache."""
    pick = spellm_picker(model, decoder, do_sample, temperature, top_k, top_p, generator, autocorrect, eos_token_id,
                         rerank_k)
    return decode_loop(model.base, pick, input_ids, attention_mask, max_new_tokens, eos_token_id)
