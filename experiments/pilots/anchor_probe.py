"""Probe behind ``--anchored_rows``: a read-out (residual MLP + k heads) trained on SmolLM2-135M's frozen
final states, with and without anchored states (real states moved towards a token along row t of
E (E^T E)^-1, labelled by the LM head there); agreement on BoolQ dev and the out-of-domain source, by
band of the label's training count. Summary: experiments/pilots/anchor-probe.json. After
experiments/pilots/anchor_probe_features.py 1000, from the repository root (the paths as run, /work/probe, made relative):

    python experiments/pilots/anchor_probe.py --geometry --direction raw|centered|dual   # how often t becomes the top-1
    python experiments/pilots/anchor_probe.py --out base.json
    python experiments/pilots/anchor_probe.py --aug 0.5 --lo 0.2 --hi 0.4 [--q_power 0.5] --out aug.json   # also --aug 1.0
    python experiments/pilots/anchor_probe.py --epochs 12 [--aug 0.5 --lo 0.2 --hi 0.4] --out base12.json  # and aug12.json

(the first aug run computed the LM head in fp32, the later ones in bf16, as the pipeline does.)
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, "."); sys.path.insert(0, "../shared/tools")
from readout_probe import END, Readout, truncate_at_end
from transformers import AutoModelForCausalLM

from spellm_ds.data import assets
from spellm_ds.model.charset import Charset
from spellm_ds.model.spelling import SpellingTable

ap = argparse.ArgumentParser()
ap.add_argument("--aug", type=float, default=0.0, help="augmented states per real state")
ap.add_argument("--lo", type=float, default=0.5); ap.add_argument("--hi", type=float, default=1.5)
ap.add_argument("--q_power", type=float, default=0.0, help="sample t ~ count^p over tokens seen >= min_count")
ap.add_argument("--min_count", type=int, default=1)
ap.add_argument("--epochs", type=int, default=4); ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--geometry", action="store_true"); ap.add_argument("--out", default=None)
ap.add_argument("--direction", default="dual")
ap.add_argument("--train_positions", type=int, default=0)
args = ap.parse_args()
torch.set_num_threads(2); torch.manual_seed(0)
md = assets.embedded_model_dir(); tok = assets.load_tokenizer(md)
charset = Charset.default()
model = AutoModelForCausalLM.from_pretrained(md, dtype=torch.bfloat16).eval()
table = SpellingTable.from_tokenizer(tok, charset, 10, model.get_output_embeddings().weight.shape[0])
E = model.get_output_embeddings().weight.detach().float()  # [V, d]
V = E.shape[0]
feats = torch.load("runs/anchor_probe_features.pt")
h, top, prob = feats["train"]
if args.train_positions: h, top, prob = h[:args.train_positions], top[:args.train_positions], prob[:args.train_positions]
seen_top1 = torch.bincount(top[:, 0], minlength=V)
counts = feats["input_counts"][:V]
ok_tok = table.spellable[:V] & (counts >= args.min_count)
q = torch.where(ok_tok, counts.clamp(min=1) ** args.q_power, torch.zeros(V))
q = q / q.sum()
ap2 = {"raw": E, "centered": E - E.mean(0), "dual": E @ torch.linalg.inv(E.T @ E)}
unit = ap2[args.direction]
unit = unit / unit.norm(dim=-1, keepdim=True)

Ebf = E.to(torch.bfloat16)
def lm_top5(states):
    logp = (states.to(torch.bfloat16) @ Ebf.T).float().log_softmax(-1)
    p, i = logp.topk(5, -1)
    return i, p.exp()

def anchored(hr, g):
    t = torch.multinomial(q, len(hr), replacement=True, generator=g)
    a = args.lo + (args.hi - args.lo) * torch.rand(len(hr), 1, generator=g)
    hr = hr.float()
    return hr + a * hr.norm(dim=-1, keepdim=True) * unit[t], t

if args.geometry:
    g = torch.Generator().manual_seed(0)
    hr = h[:4096].float()
    ti, _ = lm_top5(hr)
    cos = F.cosine_similarity(hr, E[ti[:, 0]], dim=-1)
    print("cos(h, e_top1) mean", cos.mean().item(), "norm h", hr.norm(dim=-1).mean().item(), "norm e", E.norm(dim=-1).mean().item())
    for a in (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0):
        t = torch.multinomial(q, len(hr), replacement=True, generator=g)
        hs = hr + a * hr.norm(dim=-1, keepdim=True) * unit[t]
        i, p = lm_top5(hs)
        print(f"a={a}: top1==t {(i[:,0]==t).float().mean():.3f} t in top5 {(i==t[:,None]).any(-1).float().mean():.3f} "
              f"top1 p {p[:,0].mean():.3f} orig top1 kept {(i[:,0]==ti[:,0]).float().mean():.3f}")
    sys.exit()

def score(r, eh, et):
    with torch.no_grad():
        pred = truncate_at_end(torch.cat([r(eh[i:i + 8192].float()).argmax(-1) for i in range(0, len(eh), 8192)]))
    same = (pred.unsqueeze(1) == table.chars[et]).all(-1) & table.spellable[et]
    c = seen_top1[et[:, 0]]
    bands = {}
    for lo, hi in ((0, 1), (1, 10), (10, 100), (100, 1000), (1000, 10000), (10000, 10**12)):
        m = (c >= lo) & (c < hi)
        bands[f"{lo}"] = [round(m.float().mean().item(), 4), round(same[m, 0].float().mean().item(), 4) if m.any() else None]
    return {"top1": round(same[:, 0].float().mean().item(), 4), "top5": round(same.any(-1).float().mean().item(), 4),
            "bands": bands, "correct": same[:, 0].tolist()}

def nll_labels(logits, cand, ok, p):
    logp = logits.log_softmax(-1)
    nll = -logp.unsqueeze(1).expand(-1, 5, -1, -1).gather(-1, cand.unsqueeze(-1)).squeeze(-1)
    nll = (nll * ((cand == END).long().cumsum(-1) <= 1).float()).sum(-1) - p.clamp(min=1e-30).log()
    best = nll.masked_fill(~ok, float("inf")).argmin(-1)
    return cand[torch.arange(len(cand)), best], ok.any(-1)

r = Readout(h.shape[1], 10, len(charset), True)
r.heads.init_from_embeddings(E, table.chars, table.spellable)
batch = 2048
opt = torch.optim.AdamW(r.parameters(), lr=args.lr, weight_decay=0.0)
steps = args.epochs * ((len(h) + batch - 1) // batch)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.05)
g = torch.Generator().manual_seed(0); ga = torch.Generator().manual_seed(1)
t0 = time.time()
for _ in range(args.epochs):
    order = torch.randperm(len(h), generator=g)
    for i in range(0, len(h), batch):
        idx = order[i:i + batch]
        states, tops, probs = h[idx].float(), top[idx], prob[idx]
        if args.aug > 0:
            n_aug = int(len(idx) * args.aug)
            src = states[torch.randint(len(idx), (n_aug,), generator=ga)]
            hs, _ = anchored(src, ga)
            ai, ap_ = lm_top5(hs.to(torch.bfloat16))
            states = torch.cat([states, hs.to(torch.bfloat16).float()]); tops = torch.cat([tops, ai]); probs = torch.cat([probs, ap_])
        logits = r(states).float()
        cand, ok = table.chars[tops], table.spellable[tops]
        with torch.no_grad():
            label, valid = nll_labels(logits.detach(), cand, ok, probs)
        ce = F.cross_entropy(logits.flatten(0, 1), label.flatten(), reduction="none").view_as(label)
        keep = ((label == END).long().cumsum(-1) <= 1).float()
        per = (ce * keep).sum(-1) / keep.sum(-1)
        loss = (per * valid).sum() / valid.sum().clamp(min=1)
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
row = {"args": vars(args), "train_s": round(time.time() - t0), "train_positions": len(h)}
for name in ("boolq_dev", "ood"):
    eh, et, _ = feats[name]
    row[name] = score(r, eh, et)
print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "correct"} if isinstance(v, dict) and "top1" in v else v) for k, v in row.items()}), flush=True)
if args.out: json.dump(row, open(args.out, "w"))
