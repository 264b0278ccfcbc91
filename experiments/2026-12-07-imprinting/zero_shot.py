"""Imprinting, the zero-shot gate (issue 53 item 3): do read-out inputs synthesised for every
token of the vocabulary teach the char heads to spell tokens that real text shows them rarely?

1. Real states: the teacher's final (normed) states of the first ``--train_blocks`` training
   blocks of a run's teacher cache, with their top-1.
2. A token's mean state, on tokens that are the top-1 at least ``--min_count`` times there, and a
   ridge map from a token's LM-head row to its mean state, fitted on those tokens.
3. Synthetic states: for every spellable token t, ``--per_token`` states map(E_t) + r, r a real
   residual (a state minus its top-1's mean) from a random position, then moved by ``--shift``
   times its norm along t's least-squares direction (row t of E (E^T E)^-1, as ``StateAnchors``):
   without the move the map's centre makes t the top-1 for frequent tokens only (2.6% of all
   tokens, 0.8% of those never the top-1 in training). Each state is labelled by the teacher's
   LM head, so the labels are the teacher's own; the share whose top-1 is t is the check the
   issue asks for first, split by band.
4. Heads and read-out as the default recipe starts them (no real state seen) train on the
   synthetic states only, hard labels, uniform over tokens; then the baseline's trained heads
   and these are scored on the same held-out BoolQ dev positions as the pilots: raw top-1 (the
   heads' argmax string spells the teacher's top-1), by band of the top-1's count as the
   training top-1 and by its length. A 100-999 band under 5% means the states do not transfer.

    PYTHONPATH=. .venv/bin/python experiments/2026-12-07-imprinting/zero_shot.py runs/p53/base-hf runs/p53/base
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from analysis.collect import held_out_blocks
from analysis.label_frequency import training_top1_counts
from spellm_ds.distill.metrics import BAND_EDGES, LENGTH_EDGES, group_name, group_of
from spellm_ds.hf.char_decoding import END_ID, read_string
from spellm_ds.hf.char_heads import CharHeads
from spellm_ds.model.spellm import load


def split(flags: torch.Tensor, measure: torch.Tensor, edges) -> dict[str, dict]:
    groups = group_of(measure, edges)
    return {group_name(edges, i): {"positions": int((groups == i).sum()),
                                   "raw_top1": float(flags[groups == i].float().mean()) if (groups == i).any() else None}
            for i in range(len(edges))}


def top1_of(lm_head: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    return torch.cat([(chunk @ lm_head.T).argmax(-1) for chunk in states.split(2048)])


def spelled_targets(chars: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    k = chars.shape[1]
    return chars[tokens].masked_fill(torch.arange(k) >= lengths[tokens, None] + 1, END_ID)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the baseline's export (its teacher, spelling table and trained heads)")
    parser.add_argument("run", help="the baseline's run directory (its teacher cache)")
    parser.add_argument("--train_blocks", type=int, default=400)
    parser.add_argument("--min_count", type=int, default=20)
    parser.add_argument("--ridge", type=float, default=1.0)
    parser.add_argument("--per_token", type=int, default=2)
    parser.add_argument("--shift", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max_tokens", type=int, default=8192)
    parser.add_argument("--out", default=str(Path(__file__).parent / "zero_shot.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    started = time.time()
    model = load(args.model)
    lm_head = model.get_output_embeddings().weight.float()  # [V, d]
    chars, lengths = model.spelling_chars, model.spelling_lengths
    vocab = len(chars)
    spellable = lengths > 0
    cache = Path(args.run) / "teacher_cache"
    counts = training_top1_counts(cache, vocab)

    # 1-2: real states, mean state per frequent top-1, the ridge map E_t -> mean state
    entries = [load_file(cache / "train" / f"{i}.safetensors") for i in range(args.train_blocks)]
    states = torch.cat([e["trunk"].float() for e in entries])
    top1 = torch.cat([e["top_ids"][:, 0].long() for e in entries])
    seen = torch.bincount(top1, minlength=vocab)
    sums = torch.zeros(vocab, states.shape[1]).index_add_(0, top1, states)
    frequent = (seen >= args.min_count).nonzero().squeeze(1)
    means = sums[frequent] / seen[frequent, None]
    x = torch.cat([lm_head[frequent], torch.ones(len(frequent), 1)], 1).double()
    weight = seen[frequent].double().sqrt()[:, None]  # a token's mean is surer the more it was seen
    gram = (x * weight).T @ (x * weight) + args.ridge * torch.eye(x.shape[1], dtype=torch.float64)
    mapping = torch.linalg.solve(gram, (x * weight).T @ (means.double() * weight)).float()  # [d + 1, d]
    has_mean = seen[top1] >= args.min_count
    residuals = states[has_mean] - (sums[top1[has_mean]] / seen[top1[has_mean], None])
    fit = torch.cat([lm_head[frequent], torch.ones(len(frequent), 1)], 1) @ mapping
    fit_r2 = 1 - float((fit - means).pow(2).sum() / (means - means.mean(0)).pow(2).sum())

    # 3: synthetic states for every spellable token, labelled by the LM head
    tokens = spellable.nonzero().squeeze(1).repeat(args.per_token)
    centre = torch.cat([lm_head[tokens], torch.ones(len(tokens), 1)], 1) @ mapping
    synthetic = centre + residuals[torch.randint(len(residuals), (len(tokens),))]
    direction = (lm_head[tokens] @ torch.linalg.inv(lm_head.double().T @ lm_head.double()).float())
    synthetic += args.shift * synthetic.norm(dim=-1, keepdim=True) * direction / direction.norm(dim=-1, keepdim=True)
    labels = top1_of(lm_head, synthetic)
    intended = labels == tokens
    check = {"states": len(tokens), "top1_is_intended": float(intended.float().mean()),
             "by_band": split(intended, counts[tokens], BAND_EDGES),
             "label_spellable": float(spellable[labels].float().mean())}
    print("check", json.dumps(check), flush=True)
    keep = spellable[labels]
    synthetic, labels = synthetic[keep], labels[keep]
    targets = spelled_targets(chars, lengths, labels)

    # 4: heads as the default recipe starts them, trained on the synthetic states only
    config = model.config
    heads = CharHeads(synthetic.shape[1], config.k, len(config.charset), config.readout_width)
    heads.init_from_embeddings(lm_head, chars, spellable)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=args.lr, weight_decay=0.0)
    with torch.enable_grad():
        for step in range(args.steps):
            rows = torch.randint(len(synthetic), (args.batch,))
            logits = heads(synthetic[rows]).float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[rows].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 500 == 0 or step == args.steps - 1:
                print(f"step {step} loss {loss.item():.3f}", flush=True)

    # scoring on the pilots' held-out positions
    tokenizer = model.tokenizer
    hidden = torch.cat([model.base.get_decoder()(block[None]).last_hidden_state[0]
                        for block in held_out_blocks(tokenizer, None, "text", 256, args.max_tokens)])
    teacher = top1_of(lm_head, hidden)
    target = spelled_targets(chars, lengths, teacher)
    scored = spellable[teacher]
    results = {"model": args.model, "run": args.run, "settings": vars(args), "mean_map_r2": fit_r2,
               "frequent_tokens": len(frequent), "check": check, "positions": int(scored.sum())}
    for name, module in (("baseline_trained_heads", model.char_heads), ("imprinted_zero_shot", heads)):
        exact = torch.cat([(read_string(module(chunk)) == t).all(-1) for chunk, t in zip(hidden.split(1024),
                                                                                            target.split(1024))])
        exact = exact[scored]
        results[name] = {"raw_top1": float(exact.float().mean()),
                         "by_band": split(exact, counts[teacher[scored]], BAND_EDGES),
                         "by_length": split(exact, lengths[teacher[scored]], LENGTH_EDGES)}
        print(name, json.dumps(results[name]), flush=True)
    results["seconds"] = time.time() - started
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
