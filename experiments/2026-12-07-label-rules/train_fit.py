"""Raw top-1 agreement of a model on text it trained on, by band and length, from its run's teacher
cache (the cached final states and top-5: no teacher forward). For read-out models (no trainable layers).

    .venv/bin/python experiments/2026-12-07-label-rules/train_fit.py MODEL_DIR RUN_DIR/teacher_cache [BLOCKS]
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from analysis.label_frequency import training_top1_counts
from spellm_ds.distill.metrics import BAND_EDGES, LENGTH_EDGES, group_name, group_of
from spellm_ds.hf.char_decoding import read_string
from spellm_ds.model.spellm import load

model, cache = load(sys.argv[1]), Path(sys.argv[2])
blocks = int(sys.argv[3]) if len(sys.argv) > 3 else 40
table = model.spelling
counts = training_top1_counts(cache, table.vocab_size)
agree, top1 = [], []
with torch.no_grad():
    for entry in sorted((cache / "train").glob("*.safetensors"))[:blocks]:
        tensors = load_file(entry)
        predicted = read_string(model.char_heads(tensors["trunk"].float()))
        ids = tensors["top_ids"][:, 0].long()
        agree.append((predicted == table.chars[ids]).all(-1) & table.spellable[ids])
        top1.append(ids)
agree, top1 = torch.cat(agree), torch.cat(top1)
scored = table.spellable[top1]
result = {"positions": int(scored.sum()), "raw_top1": float(agree[scored].float().mean())}
for split, values, edges in (("band", counts[top1], BAND_EDGES), ("length", table.lengths[top1], LENGTH_EDGES)):
    groups = group_of(values, edges)
    result[split] = {group_name(edges, i): [int((scored & (groups == i)).sum()),
                                            float(agree[scored & (groups == i)].float().mean())]
                     for i in range(len(edges)) if (scored & (groups == i)).any()}
print(json.dumps(result, indent=2))
