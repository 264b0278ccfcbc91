"""Which counts should rank the shortlist: the teacher's top-1 over the training blocks (known only
after the teacher read them: the teacher cache) or the training text's own tokens (known before
anything runs)? Agreement with the teacher's top-1 when the shortlist's U tokens, plus the heads'
K best valid spellings, are the candidates the LM head chooses among, and the fallback the
entropy rule needs for 95% / 98%.

    PYTHONPATH=. .venv/bin/python experiments/2026-12-08-shortlist-decoding/ranking.py MODEL_DIR RUN_DIR OUT.json
"""

import json
import sys
from pathlib import Path

import torch

from analysis.common import fallback_for_agreement
from analysis.label_frequency import training_top1_counts
from spellm_ds.data.packing import cached_packing
from spellm_ds.distill.config import RunConfig
from spellm_ds.model.spellm import load

sys.path.insert(0, str(Path(__file__).parents[1] / "2026-12-07-shortlist"))
from shortlist import collect  # noqa: E402

torch.set_num_threads(1)
model_dir, run_dir, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
top1, char_token, char_best, entropy = collect(model_dir, 8192)
student = load(model_dir)
vocab = student.spelling.vocab_size
run = RunConfig(**json.loads((run_dir / "run_config.json").read_text())["run"])
train = cached_packing(run.data, run.text_field, student.tokenizer, run.seq_len, run.eval_fraction, run.seed,
                       run.train_blocks, run.copy_lists).train
ranked_by = {"teacher_top1": training_top1_counts(run_dir / "teacher_cache", vocab),
             "text": torch.bincount(train.flatten(), minlength=vocab)}
result = {}
for name, counts in ranked_by.items():
    rank = torch.empty(vocab, dtype=torch.long)
    rank[counts.argsort(descending=True, stable=True)] = torch.arange(vocab)
    for size in (250, 1000, 2000):
        for k in (0, 1, 4):
            right = ((rank[top1] < size) | (char_best[:, :k] == top1[:, None]).any(1)).float()
            result[f"{name} U{size} k{k}"] = {"agree": round(right.mean().item(), 4),
                                              "fb95": round(fallback_for_agreement(entropy, right, 0.95), 4),
                                              "fb98": round(fallback_for_agreement(entropy, right, 0.98), 4)}
            print(name, size, k, result[f"{name} U{size} k{k}"], flush=True)
Path(out).write_text(json.dumps(result, indent=1) + "\n")
