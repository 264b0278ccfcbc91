"""Calibration of the char heads' token distribution, fitted on held-out text at export.

The heads learn one label's characters per position, so the token distribution their product
defines (:class:`~spellm_ds.decoding.CharDecoder`) is far too sure of its argmax: where the next
token is not the heads' pick it gets a log-probability 15 nats below the teacher's (median, the
reference model). Likelihood benchmarks (PIQA, OpenBookQA) and sampling read exactly those
probabilities. Two fitted numbers reshape it without moving its argmax, so top-1 agreement,
AutoCorrect and the fallback rule are untouched:

- a temperature ``T`` on the summed spelling log-probs, ``log p_T(v) = s(v) / T - logsumexp_u s(u) / T``
  (temperature scaling, Guo et al. 2017), which spreads mass to spellings close to the heads'
  pick (a temperature on each head's char logits instead spreads it less well: it also softens
  the characters a spelling does not read);
- a weight ``w`` on the training text's unigram distribution ``q``, ``p = (1 - w) p_T + w q``
  (interpolation smoothing), which gives the frequent tokens whose spelling is far from the
  heads' pick the floor a factorised product of characters cannot.

Both minimise the held-out next-token NLL, by grid search: one pass computes every valid
spelling's score per position once, and the NLL at every grid point from it. :func:`calibrate`
writes the winners into the model's ``spellm_config.json``, the token counts into
``unigram.safetensors`` and the whole NLL grid into ``calibration.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from spellm_ds.decoding import CharDecoder, mixed_log_probs, tempered_log_probs
from spellm_ds.errors import SpellmError

TEMPERATURES = tuple(round(2 ** (i / 8), 4) for i in range(-8, 25))
"""0.5 to 8, 9% apart: the NLL is flat within a step of its minimum."""
UNIGRAM_WEIGHTS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
CALIBRATION_FILE = "calibration.json"


@dataclass
class Calibration:
    temperature: float
    unigram_weight: float
    positions: int  # held-out positions whose next token the heads can spell
    nll: dict[str, dict[str, float]]  # mean next-token NLL (nats) by unigram weight, then temperature

    def nll_at(self, temperature: float, unigram_weight: float) -> float:
        return self.nll[str(unigram_weight)][str(temperature)]

    def summary(self) -> str:
        return (f"spelling temperature {self.temperature}, unigram weight {self.unigram_weight} (held-out "
                f"next-token NLL under the char heads {self.nll_at(1.0, 0.0):.3f} -> "
                f"{self.nll_at(self.temperature, self.unigram_weight):.3f} nats over {self.positions} positions)")


def token_counts(blocks: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[vocab_size]`` occurrences of each token id in ``blocks`` (int64)."""
    return torch.bincount(blocks.flatten(), minlength=vocab_size)[:vocab_size]


@torch.no_grad()
def fit(model, blocks: torch.Tensor, counts: torch.Tensor, batch_size: int = 4) -> Calibration:
    """The grid temperature and unigram weight with the lowest mean NLL of each held-out block's
    next tokens under the char heads' token distribution; ``blocks`` ``[n, seq_len]`` token ids,
    ``counts`` ``[V]`` the training text's token counts (:func:`token_counts`)."""
    decoder = CharDecoder(model.spelling, None, token_counts=counts).to(model.base.device)
    sums = torch.zeros(len(UNIGRAM_WEIGHTS), len(TEMPERATURES), dtype=torch.float64)
    positions = 0
    for batch in blocks.split(batch_size):
        batch = batch.to(model.base.device)
        char_logp = torch.log_softmax(model(input_ids=batch).char_logits[:, :-1].flatten(0, 1).float(), -1)
        targets = batch[:, 1:].flatten()
        spellable = decoder.table.spellable[targets]
        char_logp, targets = char_logp[spellable], targets[spellable]
        scores, read, unigram = decoder.spelling_scores(char_logp), decoder.read_scores(char_logp, targets), \
            decoder.unigram[targets]
        for j, temperature in enumerate(TEMPERATURES):
            tempered = tempered_log_probs(read, scores, temperature)
            for i, weight in enumerate(UNIGRAM_WEIGHTS):
                sums[i, j] -= mixed_log_probs(tempered, unigram, weight).double().sum().cpu()
        positions += len(targets)
    if positions == 0:
        raise SpellmError("no held-out position has a next token the char heads can spell; "
                          "calibration needs held-out text (add documents)")
    nll = sums / positions
    best_weight, best_temperature = divmod(int(nll.argmin()), len(TEMPERATURES))
    return Calibration(TEMPERATURES[best_temperature], UNIGRAM_WEIGHTS[best_weight], positions,
                       {str(w): {str(t): float(v) for t, v in zip(TEMPERATURES, row)}
                        for w, row in zip(UNIGRAM_WEIGHTS, nll)})


def calibrate(model_dir: Path, blocks: torch.Tensor, training_blocks: torch.Tensor) -> Calibration:
    """Fit the SpeLLM directory ``model_dir``'s temperature and unigram weight on held-out ``blocks``,
    the unigram counted on ``training_blocks``, and record them."""
    from spellm_ds.model import UNIGRAM_FILE, SpeLLMForCausalLM

    model = SpeLLMForCausalLM.from_pretrained(model_dir)
    counts = token_counts(training_blocks, model.spelling.vocab_size)
    found = fit(model, blocks, counts)  # reads the heads' scores, whatever is recorded
    model.config.spelling_temperature, model.config.unigram_weight = found.temperature, found.unigram_weight
    save_file({"token_counts": counts}, model_dir / UNIGRAM_FILE)
    model.config.save(model_dir)
    (model_dir / CALIBRATION_FILE).write_text(json.dumps(asdict(found), indent=2) + "\n")
    return found
