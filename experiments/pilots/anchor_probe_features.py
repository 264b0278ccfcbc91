"""Features for experiments/pilots/anchor_probe.py: SmolLM2-135M's frozen final states and top-5 on N blocks of the
shuffled default corpus, BoolQ dev and the out-of-domain source, and the corpus's input-token counts.
Run as it was (it imports the read-out probe's helpers from ../shared/tools): python experiments/pilots/anchor_probe_features.py 1000
"""
import sys
import time

import torch

sys.path.insert(0, "."); sys.path.insert(0, "../shared/tools")
from readout_probe import features
from transformers import AutoModelForCausalLM

from spellm_ds.data import assets, corpus
from spellm_ds.data.packing import pack

torch.set_num_threads(2)
md = assets.embedded_model_dir(); tok = assets.load_tokenizer(md)
model = AutoModelForCausalLM.from_pretrained(md, dtype=torch.bfloat16).eval()
texts = corpus.training_texts()
import random; random.Random(0).shuffle(texts)
t0 = time.time()
allblocks = pack(texts, tok, 256)
print("corpus blocks", allblocks.shape, time.time() - t0, flush=True)
counts = torch.bincount(allblocks.flatten(), minlength=len(tok)).float()
n = int(sys.argv[1])
blocks = {"train": allblocks[:n], "boolq_dev": pack(assets.held_out_texts(), tok, 256, max_blocks=32),
          "ood": pack(corpus.out_of_domain_texts(), tok, 256, max_blocks=32)}
feats = {k: features(model, b) for k, b in blocks.items()}
feats["input_counts"] = counts
feats["train_ids"] = blocks["train"]
torch.save(feats, "runs/anchor_probe_features.pt")
print("done", time.time() - t0, flush=True)
