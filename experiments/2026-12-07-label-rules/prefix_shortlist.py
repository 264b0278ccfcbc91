"""How often the teacher's top-1 lies among the tokens that share the heads' first m predicted
characters (at most K of them, the most frequent in the training text first): the bound of a
prefix-shortlist re-ranking by K LM-head rows (issue 53, item 7).

    .venv/bin/python experiments/2026-12-07-label-rules/prefix_shortlist.py MODEL_DIR TRAIN_BLOCKS [MAX_TOKENS]
"""

import argparse
import json
import sys

import torch

from analysis.collect import collect
from spellm_ds.data.packing import cached_packing

analysis = collect(argparse.Namespace(model=sys.argv[1], data=None, text_field="text", teacher=None,
                                      max_tokens=int(sys.argv[3]) if len(sys.argv) > 3 else 8192, seq_len=256,
                                      batch_size=4, tau=None, rerank_k=0))
records, table = analysis.records, analysis.table
train = cached_packing(None, "text", analysis.tokenizer, 256, 0.02, 0, int(sys.argv[2])).train
frequency = torch.bincount(train.flatten(), minlength=table.vocab_size).float()
top1 = records.top_ids[:, 0]
scored = table.spellable[top1]
teacher = table.lookup(table.chars[top1])  # the canonical token of the teacher's spelling
canonical = table.canonical.nonzero().squeeze(1)
result = {"positions": len(top1), "raw_top1": float(((records.raw_chars == table.chars[top1]).all(-1) & scored)
                                                    .float().mean())}
for m in (1, 2, 3, 4):
    keys, group_of_token = torch.unique(table.chars[canonical][:, :m], dim=0, return_inverse=True)
    column = torch.full((table.vocab_size,), -1, dtype=torch.long)
    column[canonical] = group_of_token
    match = (records.raw_chars[:, :m].unsqueeze(1) == keys.unsqueeze(0)).all(-1)
    group = torch.where(match.any(1), match.float().argmax(1), -1)
    right = (group >= 0) & scored & (teacher >= 0) & (column[teacher.clamp(min=0)] == group)
    sizes = torch.bincount(group_of_token, minlength=len(keys))
    row = {"prefix_right": float(right.float().mean()),
           "median_shortlist": int(sizes[group[group >= 0]].float().median())}
    for k in (16, 64, 256, 1024):
        covered = 0
        for i in right.nonzero().squeeze(1).tolist():
            members = canonical[group_of_token == group[i]]
            covered += bool((members[frequency[members].argsort(descending=True)][:k] == teacher[i]).any())
        row[f"covered_at_{k}"] = covered / len(top1)
    result[f"m={m}"] = row
print(json.dumps(result, indent=2))
