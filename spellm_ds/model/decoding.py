"""The package's decode loop: a KV cache, left-padded batches, one pick of the next tokens per step.

The pick is SpeLLM's output head (:func:`spellm_picker`, on :mod:`spellm_ds.hf.char_decoding`: char
heads, lookup, AutoCorrect, entropy fallback, re-ranking, sampling) or the LM head alone
(:func:`lm_head_picker`, the reference it is compared with). An exported model's ``generate()``
(:mod:`spellm_ds.hf.modeling_spellm`) makes the same picks through transformers' own generation loop
(tested to give the same tokens); this loop adds each token's provenance and costs no
full-vocabulary distribution on greedy steps, so the benchmarks and analyses time it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from spellm_ds.hf.char_decoding import DEFAULT_TAU, CharDecoder, Provenance, greedy_tokens, provenance, sample


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
    """The SpeLLM output head: greedy steps by :func:`~spellm_ds.hf.char_decoding.greedy_tokens`
    (the argmax string's token, AutoCorrect on missed rows only, the LM head on fallback rows
    only), sampled ones from :meth:`~spellm_ds.hf.char_decoding.CharDecoder.mixture_log_probs`.

    With ``autocorrect=False`` (greedy only) a string that is no token's spelling has no token to
    emit: the row ends there with ``eos_token_id`` (its provenance stays AUTOCORRECTED, marking
    the miss). ``rerank_k``: greedy only; it and a shortlist (``decoder``'s) need AutoCorrect. One
    device->host transfer per token carries the fallback
    and hit masks and the previous step's finished flags (the stopping check) together.
    """
    if not autocorrect and (do_sample or eos_token_id is None):
        raise ValueError("decoding without AutoCorrect is greedy and needs an eos_token_id to end a missed row")
    if rerank_k and do_sample:
        raise ValueError("re-ranking (rerank_k > 0) is greedy decoding: drop do_sample, or set rerank_k=0")
    if decoder.reranks(rerank_k) and not autocorrect:
        raise ValueError("re-ranking and the shortlist choose a token on every row the heads decide: "
                         "drop autocorrect=False, or set rerank_k=0 and shortlist=0")
    lm_head = model.base.get_output_embeddings()

    def pick(hidden: torch.Tensor, finished: torch.Tensor):
        char_logits = model.char_heads(hidden)
        if do_sample:
            if finished.all():
                return None, None
            log_probs, proposal, _ = decoder.mixture_log_probs(char_logits, hidden, lm_head)
            return sample(log_probs, temperature, top_k, top_p, generator), provenance(proposal)
        proposal = decoder.propose(char_logits, autocorrect=False)
        batch = len(hidden)
        host = torch.cat([proposal.fallback, proposal.hit, finished]).cpu()
        if host[2 * batch:].all():
            return None, None
        return greedy_tokens(decoder, char_logits, hidden, lm_head, proposal, host[:batch], host[batch : 2 * batch],
                             rerank_k, autocorrect, eos_token_id)

    return pick


MODEL_EOS = object()
"""``eos_token_id``'s default: the EOS of the model's tokenizer."""


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 64,
             tau: float | None = DEFAULT_TAU, eos_token_id: int | None | object = MODEL_EOS, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None, autocorrect: bool = True, rerank_k: int = 0,
             shortlist: int = 0) -> GenerationOutput:
    """Decode with the char heads of ``model`` (an exported SpeLLM model, :func:`spellm_ds.model.spellm.load`)
    at fallback threshold ``tau`` with a ``shortlist`` of that many frequent tokens (see
    :func:`spellm_picker`) over a KV cache; ``eos_token_id`` None never stops early. Returns the
    new tokens and each one's provenance."""
    if eos_token_id is MODEL_EOS:
        eos_token_id = model.tokenizer.eos_token_id
    pick = spellm_picker(model, model.char_decoder(tau, shortlist), do_sample, temperature, top_k, top_p, generator,
                         autocorrect, eos_token_id, rerank_k)
    return decode_loop(model.base, pick, input_ids, attention_mask, max_new_tokens, eos_token_id)
