"""How often would a shortlist of the most frequent tokens, scored exactly by the LM head, hold the
teacher's top-1, alone and together with the char heads' best candidates? (issues 53 and 57)

The shortlist is the U tokens most often the teacher's top-1 over the training blocks a run read (its
teacher cache): known before any head is trained. Over a candidate set that holds the teacher's
top-1, the LM head's argmax is that token (the default recipe's LM head is the teacher's), so "holds"
is "agrees". The char heads' candidates are the K valid spellings they score highest (the set
``--rerank_k K`` re-ranks). Beside each set: the fallback its agreement needs for 95% and 98% with
the package's rule (the heads' mean entropy), and its cost in LM-head rows.

    PYTHONPATH=. .venv/bin/python experiments/2026-12-07-shortlist/shortlist.py MODEL_DIR RUN_DIR/teacher_cache \
        POSITIONS OUT.json
"""

import json
import sys
from pathlib import Path

import torch

from analysis.collect import held_out_blocks
from analysis.common import fallback_for_agreement
from analysis.label_frequency import training_top1_counts
from spellm_ds.distill.forward import teacher_and_student
from spellm_ds.distill.losses import label_rule_of
from spellm_ds.distill.metrics import BAND_EDGES, group_name, group_of
from spellm_ds.model.spellm import load, load_teacher, shared_trunk_layer

SHORTLISTS = (0, 250, 500, 1000, 2000, 4000, 8000)
CHAR_CANDIDATES = (0, 1, 4, 16, 64)
TARGETS = (0.95, 0.98)
TAU = 0.22


@torch.no_grad()
def collect(model_dir: str, positions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per held-out position: the teacher's top-1, the char path's token, the heads' 64 best valid
    spellings' ids, the heads' mean entropy."""
    student = load(model_dir)
    teacher = load_teacher(student, student.config.teacher)
    table, decoder = student.spelling, student.char_decoder(TAU)
    blocks = held_out_blocks(student.tokenizer, None, "text", 256, positions)
    trunk = shared_trunk_layer(student.base.config.num_hidden_layers, student.config.trainable_layers)
    parts = []
    for start in range(0, len(blocks), 4):
        batch = blocks[start : start + 4]
        signal, out, _ = teacher_and_student(teacher, student, batch, table, label_rule_of(student.config), trunk,
                                             with_token_logits=False, targets=torch.cat([batch[:, 1:], batch[:, :1]], 1))
        char_logits = out.char_logits.flatten(0, 1).float()
        proposal = decoder.propose(char_logits)
        scores = decoder.spelling_scores(torch.log_softmax(char_logits, -1))
        best = decoder.valid_ids[scores.topk(max(CHAR_CANDIDATES), -1).indices]
        parts.append((signal.top_ids.flatten(0, 1)[:, 0], proposal.token_ids, best, proposal.entropy))
    return tuple(torch.cat(column) for column in zip(*parts))



def main(model_dir: str, cache_dir: str, positions: int, out: str) -> None:
    torch.set_num_threads(1)
    top1, char_token, char_best, entropy = collect(model_dir, positions)
    vocab = load(model_dir).spelling.vocab_size
    counts = training_top1_counts(Path(cache_dir), vocab)
    rank = torch.empty(vocab, dtype=torch.long)
    rank[counts.argsort(descending=True, stable=True)] = torch.arange(vocab)
    rows = {}
    for shortlist in SHORTLISTS:
        for k in CHAR_CANDIDATES:
            if not shortlist and not k:
                continue
            right = (rank[top1] < shortlist) | (char_best[:, :k] == top1[:, None]).any(1)
            rows[f"shortlist {shortlist} + char top-{k}"] = right.float()
    rows["char path (lookup or AutoCorrect: the paper's)"] = (char_token == top1).float()
    band = group_of(counts[top1], BAND_EDGES)
    bands = {group_name(BAND_EDGES, b): band == b for b in range(len(BAND_EDGES))}
    table = {name: {"agreement without fallback": round(right.mean().item(), 4),
                    "by training count band of the teacher's top-1": {
                        label: round(right[rows].mean().item(), 4) for label, rows in bands.items() if rows.any()},
                    "LM-head rows per token": int(name.split()[1]) + int(name.split("top-")[1])
                    if name.startswith("shortlist") else 0,
                    "agreement at tau 0.22": round(torch.where(entropy >= TAU, 1.0, right).mean().item(), 4),
                    **{f"fallback for {t:.0%}": round(fallback_for_agreement(entropy, right, t), 4) for t in TARGETS}}
             for name, right in rows.items()}
    result = {"model": model_dir, "teacher cache": cache_dir, "positions": len(top1), "vocabulary": vocab,
              "band shares": {label: round(rows.float().mean().item(), 4) for label, rows in bands.items()},
              "tokens ever the teacher's top-1 in training": int((counts > 0).sum()),
              "fallback at tau 0.22": round((entropy >= TAU).float().mean().item(), 4), "sets": table}
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    for name, row in table.items():
        print(f"{name:48s} " + "  ".join(f"{key}: {value}" for key, value in row.items() if key.startswith(("agree", "fall"))))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
