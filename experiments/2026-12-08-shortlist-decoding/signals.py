"""Which rule should send a position to the LM head once the shortlist is among the candidates?
(issue 57: fallback is what costs the speed.)

With `--shortlist U` the LM head already scores U + 1 candidates on every decided row, so its own
logits over them are a fallback signal the char heads alone did not have. Per held-out position:
whether the best candidate is the teacher's top-1, the heads' mean entropy (the package's rule),
the best candidate's log-probability within the candidates, the margin of its logit over the
next one, its logit, and the heads' probability of spellings outside the candidates (which needs
every spelling scored on every row, as AutoCorrect does). Each rule's fallback for 95% / 98%
agreement ranks positions by one signal; the logistic gate is fitted on the first half of the
blocks and scored on the second.

    PYTHONPATH=. .venv/bin/python experiments/2026-12-08-shortlist-decoding/signals.py MODEL_DIR POSITIONS U OUT.json
"""

import json
import sys
from pathlib import Path

import torch

from analysis.collect import held_out_blocks
from analysis.common import fallback_for_agreement
from spellm_ds.distill.forward import teacher_and_student
from spellm_ds.distill.losses import label_rule_of
from spellm_ds.hf.char_decoding import best_candidate, looked_up
from spellm_ds.model.spellm import load, load_teacher, shared_trunk_layer

TARGETS = (0.95, 0.98)


@torch.no_grad()
def collect(model_dir: str, positions: int, size: int) -> dict[str, torch.Tensor]:
    student = load(model_dir, shortlist=size)
    teacher = load_teacher(student, student.config.teacher)
    decoder, lm_head = student.char_decoder(None, size), student.base.get_output_embeddings()
    blocks = held_out_blocks(student.tokenizer, None, "text", 256, positions)
    trunk = shared_trunk_layer(student.base.config.num_hidden_layers, student.config.trainable_layers)
    columns: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(blocks), 4):
        batch = blocks[start : start + 4]
        signal, out, _ = teacher_and_student(teacher, student, batch, student.spelling, label_rule_of(student.config),
                                             trunk, with_token_logits=False,
                                             targets=torch.cat([batch[:, 1:], batch[:, :1]], 1))
        char_logits, hidden = out.char_logits.flatten(0, 1).float(), out.hidden.flatten(0, 1)
        proposal = decoder.propose(char_logits)
        scores = decoder.spelling_scores(torch.log_softmax(char_logits, -1)) / decoder.temperature
        found = decoder.rerank_candidates(scores, hidden, lm_head, 0, looked_up(proposal))
        top2 = found.logits.topk(2, -1).values
        for name, column in (("right", best_candidate(found.ids, found.logits) == signal.top_ids.flatten(0, 1)[:, 0]),
                             ("entropy", proposal.entropy),
                             ("within_logp", -torch.log_softmax(found.logits, -1).max(-1).values),
                             ("margin", -(top2[:, 0] - top2[:, 1])),
                             ("best_logit", -top2[:, 0]),
                             ("heads_mass_outside", scores.logsumexp(-1) - found.scores.logsumexp(-1)),
                             ("block", torch.full((len(hidden),), start // 4))):
            columns.setdefault(name, []).append(column)
    return {name: torch.cat(parts) for name, parts in columns.items()}



def logistic_gate(features: torch.Tensor, right: torch.Tensor, fit: torch.Tensor) -> torch.Tensor:
    """-logit P(right) of a logistic regression on standardised ``features`` fitted on rows ``fit``."""
    mean, std = features[fit].mean(0), features[fit].std(0)
    x = (features - mean) / std
    weights = torch.zeros(x.shape[1] + 1, requires_grad=True)
    optimiser = torch.optim.LBFGS([weights], max_iter=200)

    def loss():
        optimiser.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(x[fit] @ weights[:-1] + weights[-1],
                                                                     right[fit].float())
        value.backward()
        return value

    optimiser.step(loss)
    return -(x @ weights[:-1] + weights[-1]).detach()


def main(model_dir: str, positions: int, size: int, out: str) -> None:
    torch.set_num_threads(2)
    data = collect(model_dir, positions, size)
    right, blocks = data["right"], data["block"]
    scored = blocks >= blocks.max() // 2 + 1  # the second half of the blocks
    signals = {name: data[name].float() for name in ("entropy", "within_logp", "margin", "best_logit",
                                                       "heads_mass_outside")}
    features = torch.stack([signals[name] for name in signals], 1)
    signals["logistic gate (all five)"] = logistic_gate(features, right, ~scored)
    signals["oracle"] = (~right).float()
    result = {"model": model_dir, "positions": int(scored.sum()), "shortlist": size,
              "agreement_without_fallback": round(right[scored].float().mean().item(), 4), "rules": {}}
    for name, unsure in signals.items():
        needed = {t: fallback_for_agreement(unsure[scored], right[scored], t) for t in TARGETS}
        result["rules"][name] = {f"fallback for {t:.0%}": round(value, 4) for t, value in needed.items()}
        print(f"{name:28s} {result['rules'][name]}", flush=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
