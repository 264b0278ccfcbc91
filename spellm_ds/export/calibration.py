"""Temperature scaling of the char heads' token distribution, fitted on held-out text at export.

The heads learn one label's characters per position, so the token distribution their product
defines (:class:`~spellm_ds.model.decoding.CharDecoder`) is far too sure of its argmax: where the next
token is not the heads' pick it gets a log-probability 15 nats below the teacher's (median, the
reference model). Likelihood benchmarks (PIQA, OpenBookQA) and sampling read exactly those
probabilities. One temperature ``T`` on the summed spelling log-probs,
``log p(v) = s(v) / T - logsumexp_u s(u) / T``, fitted to minimise the held-out next-token NLL
(temperature scaling, Guo et al. 2017), spreads the distribution without moving its argmax, so
top-1 agreement, AutoCorrect and the fallback rule are untouched. (A temperature on each head's
char logits instead spreads it less well: it also softens the characters a spelling does not read.)

The fit is a grid search: one pass computes every valid spelling's score per position once and
the NLL at every grid temperature from it. Export fits it before writing the model;
:func:`calibrate` refits an exported model, writing the winner into its ``config.json`` and the
whole curve into ``calibration.json`` beside it (each replaced atomically).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from spellm_ds.errors import SpellmError
from spellm_ds.hf.char_decoding import log_normaliser, tempered_log_probs
from spellm_ds.runtime.atomic import replace_file

TEMPERATURES = tuple(round(2 ** (i / 8), 4) for i in range(-8, 25))
"""0.5 to 8, 9% apart: the NLL is flat within a step of its minimum."""
CALIBRATION_FILE = "calibration.json"


@dataclass
class Calibration:
    temperature: float
    positions: int  # held-out positions whose next token the heads can spell
    nll: dict[str, float]  # mean next-token NLL (nats) at each grid temperature, "1.0" as trained

    def summary(self) -> str:
        return (f"spelling temperature {self.temperature} (held-out next-token NLL under the char heads "
                f"{self.nll['1.0']:.3f} -> {self.nll[str(self.temperature)]:.3f} nats over {self.positions} positions)")


@torch.no_grad()
def fit_spelling_temperature(model, blocks: torch.Tensor, batch_size: int = 4) -> Calibration:
    """The grid temperature with the lowest mean NLL of each block's next tokens under the char
    heads' token distribution; ``blocks`` ``[n, seq_len]`` of held-out token ids."""
    from spellm_ds.model.spellm import spellm_outputs

    decoder = model.char_decoder(None)
    sums = torch.zeros(len(TEMPERATURES), dtype=torch.float64)
    positions = 0
    for batch in blocks.split(batch_size):
        batch = batch.to(model.base.device)
        char_logits = spellm_outputs(model, input_ids=batch).char_logits
        char_logp = torch.log_softmax(char_logits[:, :-1].flatten(0, 1).float(), -1)
        targets = batch[:, 1:].flatten()
        spellable = decoder.table.spellable[targets]
        char_logp, targets = char_logp[spellable], targets[spellable]
        scores, read = decoder.spelling_scores(char_logp), decoder.read_scores(char_logp, targets)
        for i, temperature in enumerate(TEMPERATURES):
            sums[i] -= tempered_log_probs(read, log_normaliser(scores, temperature), temperature).double().sum().cpu()
        positions += len(targets)
    if positions == 0:
        raise SpellmError("no held-out position has a next token the char heads can spell; "
                          "the spelling temperature needs held-out text (add documents)")
    nll = sums / positions
    return Calibration(TEMPERATURES[int(nll.argmin())], positions,
                       {str(t): float(v) for t, v in zip(TEMPERATURES, nll)})


def calibrate(model_dir: Path, blocks: torch.Tensor, dtype: torch.dtype | str = torch.float32,
              device: str = "cpu") -> Calibration:
    """Fit the spelling temperature of the SpeLLM directory ``model_dir`` on ``blocks`` and record it."""
    from spellm_ds.model.spellm import load

    model = load(model_dir, dtype=dtype, device=device)
    found = fit_spelling_temperature(model, blocks)  # reads the heads' scores, whatever T is recorded
    model.config.spelling_temperature = found.temperature
    replace_file(model_dir / "config.json", model.config.to_json_string())
    replace_file(model_dir / CALIBRATION_FILE, json.dumps(asdict(found), indent=2) + "\n")
    return found
