"""Ad hoc: how calibrated is the char heads' token distribution where they score (entropy < tau)?

On held-out BoolQ dev positions (the analysis default), at positions where SpeLLM + fallback would
score with the char heads: mean NLL of the real next token and the cross-entropy against the
teacher's top-5 (renormalised), for the heads' logits divided by T, beside the teacher's own.
"""

import json
import sys

import torch

from analysis.collect import held_out_blocks
from spellm_ds.distill.teacher import lm_head_log_probs
from spellm_ds.hf.char_decoding import falls_back, mean_head_entropy, read_string
from spellm_ds.model.spellm import SpeLLMForCausalLM

model_dir, max_tokens, tau = sys.argv[1], int(sys.argv[2]), 0.22
TEMPERATURES = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)
torch.set_grad_enabled(False)
model = SpeLLMForCausalLM.from_pretrained(model_dir)
decoder = model.char_decoder(None)
blocks = held_out_blocks(model.tokenizer, None, "text", 256, max_tokens)
nll = {t: [] for t in TEMPERATURES}
top5_ce = {t: [] for t in TEMPERATURES}
teacher_nll, teacher_top5_ce, positions = [], [], 0
for block in blocks:
    hidden = model.base.get_decoder()(input_ids=block[None]).last_hidden_state[0, :-1]
    targets = block[1:]
    char_logits = model.char_heads(hidden)
    heads = ~falls_back(mean_head_entropy(char_logits), read_string(char_logits), tau)
    positions += len(targets)
    teacher = lm_head_log_probs(model.base.get_output_embeddings(), hidden[heads])
    top_p, top_ids = teacher.exp().topk(5, -1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    teacher_nll.append(-teacher.gather(-1, targets[heads, None]).squeeze(-1))
    teacher_top5_ce.append(-(top_p * teacher.gather(-1, top_ids)).sum(-1))
    logits = char_logits[heads]
    for t in TEMPERATURES:
        nll[t].append(-decoder.spelling_log_probs(logits / t, targets[heads]))
        per_candidate = torch.stack([decoder.spelling_log_probs(logits / t, top_ids[:, j]) for j in range(5)], -1)
        top5_ce[t].append(-(top_p * per_candidate.clamp(min=-100)).sum(-1))

cat = lambda parts: torch.cat(parts)  # noqa: E731
n = len(cat(teacher_nll))
out = {"model": model_dir, "positions": positions, "char_head_positions": n, "tau": tau,
       "teacher": {"nll": float(cat(teacher_nll).mean()), "top5_ce": float(cat(teacher_top5_ce).mean())},
       "heads": {str(t): {"nll": float(cat(nll[t]).clamp(max=100).mean()), "top5_ce": float(cat(top5_ce[t]).mean())}
                 for t in TEMPERATURES}}
print(json.dumps(out, indent=1))
json.dump(out, open(sys.argv[3], "w"), indent=1)
