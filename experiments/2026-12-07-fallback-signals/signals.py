"""Would another fallback rule fall back less at the same agreement with the teacher? (issue 57)

On held-out BoolQ dev positions, the char path's token (lookup or AutoCorrect) is compared with the
teacher's top-1. Each rule ranks positions by how unsure the heads are and hands the least sure to
the LM head (which, in the default recipe, is the teacher's); the table gives the fallback rate each
rule needs for 95% and 98% agreement. Cheap rules: the mean head entropy (the package's rule), the
largest head entropy, -log p of the argmax string (summed or per character). Learned gates: logistic
regressions and a small MLP predicting "the char path is right", fitted on the first half of the
blocks, scored on the second. The oracle knows which rows are wrong.

    PYTHONPATH=. .venv/bin/python experiments/2026-12-07-fallback-signals/signals.py MODEL_DIR POSITIONS OUT.json
"""

import json
import sys
from pathlib import Path

import torch

from analysis.collect import held_out_blocks
from analysis.common import fallback_for_agreement
from spellm_ds.distill.forward import teacher_and_student
from spellm_ds.distill.losses import label_rule_of
from spellm_ds.hf.char_decoding import after_first_end
from spellm_ds.model.spellm import load, load_teacher, shared_trunk_layer

TARGETS = (0.95, 0.98)


@torch.no_grad()
def collect(model_dir: str, positions: int) -> dict[str, torch.Tensor]:
    student = load(model_dir)
    teacher = load_teacher(student, student.config.teacher)
    table, decoder = student.spelling, student.char_decoder(0.22)
    blocks = held_out_blocks(student.tokenizer, None, "text", 256, positions)
    trunk = shared_trunk_layer(student.base.config.num_hidden_layers, student.config.trainable_layers)
    columns = {name: [] for name in ("hidden", "features", "right", "mean_entropy", "max_entropy", "neg_logp",
                                     "neg_logp_per_char")}
    for start in range(0, len(blocks), 4):
        batch = blocks[start : start + 4]
        targets = torch.cat([batch[:, 1:], batch[:, :1]], 1)
        signal, out, _ = teacher_and_student(teacher, student, batch, table, label_rule_of(student.config), trunk,
                                             with_token_logits=False, targets=targets)
        char_logits = out.char_logits.flatten(0, 1).float()
        proposal = decoder.propose(char_logits)
        logp = torch.log_softmax(char_logits, -1)
        read = (~after_first_end(char_logits.argmax(-1))).float()
        entropy = -(logp.exp() * logp).sum(-1) * read
        best = logp.max(-1).values * read
        columns["hidden"].append(out.hidden.flatten(0, 1).float())
        columns["features"].append(torch.cat([entropy, read, proposal.entropy[:, None],
                                              proposal.hit[:, None].float()], 1))
        columns["right"].append((proposal.token_ids == signal.top_ids.flatten(0, 1)[:, 0]).float())
        columns["mean_entropy"].append(proposal.entropy)
        columns["max_entropy"].append(entropy.max(-1).values)
        columns["neg_logp"].append(-best.sum(-1))
        columns["neg_logp_per_char"].append(-best.sum(-1) / read.sum(-1))
    return {name: torch.cat(parts) for name, parts in columns.items()}



def logistic(x: torch.Tensor, y: torch.Tensor, l2: float):
    w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return lambda z: (z @ w + b).detach()


def mlp(x: torch.Tensor, y: torch.Tensor, epochs: int, width: int = 64):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], width), torch.nn.GELU(), torch.nn.Linear(width, 1))
    optimizer = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
    for _ in range(epochs):
        for batch in torch.randperm(len(y)).split(256):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[batch]).squeeze(1), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return lambda z: net(z).squeeze(1).detach()


def main(model_dir: str, positions: int, out: str) -> None:
    torch.set_num_threads(1)
    c = collect(model_dir, positions)
    n = len(c["right"])
    half = n // 512 * 256  # whole blocks: fit on the first half, score on the second
    fit, test = slice(0, half), slice(half, n)
    inputs = {"features": c["features"], "hidden + features": torch.cat([c["hidden"], c["features"]], 1)}
    inputs = {name: (x - x[fit].mean(0)) / (x[fit].std(0) + 1e-6) for name, x in inputs.items()}
    right = c["right"]
    unsure = {rule: c[rule][test] for rule in ("mean_entropy", "max_entropy", "neg_logp", "neg_logp_per_char")}
    for name, x in inputs.items():
        for l2 in (1e-4, 1e-2):
            unsure[f"logistic on {name} (l2 {l2:g})"] = -logistic(x[fit], right[fit], l2)(x[test])
    for epochs in (5, 30):
        x = inputs["hidden + features"]
        unsure[f"MLP 64 on hidden + features ({epochs} epochs)"] = -mlp(x[fit], right[fit], epochs)(x[test])
    unsure["oracle"] = 1 - right[test]
    table = {rule: {f"{t:.0%}": round(fallback_for_agreement(u, right[test], t), 4) for t in TARGETS}
             for rule, u in unsure.items()}
    result = {"model": model_dir, "positions": n, "scored": n - half,
              "char path right (top-1)": round(right[test].mean().item(), 4),
              "fallback needed for agreement": table}
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    for rule, row in table.items():
        print(f"{rule:48s} " + "  ".join(f"{t}: {v:.3f}" for t, v in row.items()))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
