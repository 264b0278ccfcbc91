"""Does the shortlist need AutoCorrect? Agreement (the teacher's top-1 among the candidates: the LM
head is the teacher's) when the heads add their argmax string's token only where it spells one,
against adding AutoCorrect's token where it does not; and the fallback each needs for 95%.

    PYTHONPATH=. .venv/bin/python experiments/2026-12-08-shortlist-decoding/autocorrect.py MODEL_DIR
"""

import argparse
import sys

import torch

from analysis.collect import collect
from analysis.common import fallback_for_agreement
from spellm_ds.hf.char_decoding import frequent_spellings
from spellm_ds.model.spellm import load

model_dir = sys.argv[1]
analysis = collect(argparse.Namespace(model=model_dir, data=None, text_field="text", teacher=None, max_tokens=8192,
                                      seq_len=256, batch_size=4, tau=None, rerank_k=0, shortlist=0))
r, table = analysis.records, analysis.table
counts = load(model_dir).token_counts
top1 = table.lookup(table.chars[r.top_ids[:, 0]])
for size in (0, 250, 1000):
    on = torch.zeros(table.vocab_size, dtype=torch.bool)
    if size:
        on[frequent_spellings(table, counts, size)] = True
    with_autocorrect = on[top1] | (r.autocorrected == top1)
    spelled_only = on[top1] | (r.hit & (r.autocorrected == top1))
    print(f"U {size}: with AutoCorrect {with_autocorrect.float().mean():.4f}, spelled only "
          f"{spelled_only.float().mean():.4f}; fallback for 95% "
          f"{fallback_for_agreement(r.student_entropy, with_autocorrect, 0.95):.4f} / "
          f"{fallback_for_agreement(r.student_entropy, spelled_only, 0.95):.4f}; hit rate {r.hit.float().mean():.3f}")
