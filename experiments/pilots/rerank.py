"""Probe: how much does re-ranking the char heads' top-K spellings by the LM head agree with the teacher?

    PYTHONPATH=. python experiments/pilots/rerank.py experiments/pilots/rerank.json runs/smollm2-135m/model [MODEL ...]

For each K, every position's char-path token is :meth:`CharDecoder.rerank`'s (``--rerank_k K`` of
decoding; every K from one pass over the vocabulary, as the first K of the top 64) instead of the
lookup or AutoCorrect, and is compared with the teacher's top-1 by spelling, paired with the shipped
decoding on the same positions: with no fallback, with fallback at tau 0.22, and at fallback budgets
that send the highest-entropy share of positions to the LM head (counted as agreeing: the default
recipe's LM head reads the teacher's own state). "recall" is the share of positions whose teacher
top-1 is among the K candidates (what re-ranking can reach at most). Also: the smallest fallback
rate at which each reaches 95% agreement (the entropy rule). Positions whose teacher token is
unspellable are left out. Texts: BoolQ dev and the out-of-domain source, 32 blocks of 256 tokens
each (the reports' 8,192 positions). With several models (of one tokenizer), each after the first is
also paired with the first on the same positions (``vs_first``: K = 16 and shipped, with no fallback
and at each budget, each model's budget taken by its own entropy).
"""

import json
import sys

import torch

from analysis.common import paired_difference
from spellm_ds.data import assets
from spellm_ds.data.corpus import out_of_domain_texts
from spellm_ds.data.packing import pack
from spellm_ds.hf.char_decoding import best_candidate
from spellm_ds.model.spellm import load

KS = (1, 2, 4, 8, 16, 32, 64)
PAIRED_K = 16
BUDGETS = (0.05, 0.1, 0.15, 0.3)
TARGET = 0.95


@torch.no_grad()
def probe(model, blocks: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
    """The summary of one model on one text, and its per-position 0/1 columns for pairing."""
    decoder = model.char_decoder(0.22)
    table, lm_head = decoder.table, model.base.get_output_embeddings()
    entropy, fallback, shipped, recall, reranked = [], [], [], {k: [] for k in KS}, {k: [] for k in KS}
    for batch in blocks.split(4):
        out = model(input_ids=batch, with_token_logits=True)
        hidden, char_logits = out.hidden.flatten(0, 1), out.char_logits.flatten(0, 1).float()
        teacher_top1 = out.token_logits.flatten(0, 1).float().argmax(-1)
        spellable = table.spellable[teacher_top1]
        hidden, char_logits, want = hidden[spellable], char_logits[spellable], table.chars[teacher_top1[spellable]]
        # one pass over the vocabulary for AutoCorrect and every K: the top-K are the first K of the top-max(KS)
        scores = decoder.spelling_scores(torch.log_softmax(char_logits, -1))
        proposal = decoder.proposal_from(char_logits, scores)
        entropy.append(proposal.entropy), fallback.append(proposal.fallback)
        shipped.append((table.chars[proposal.token_ids] == want).all(-1))
        candidates, _, logits = decoder.rerank_candidates(scores, hidden, lm_head, max(KS))
        for k in KS:
            recall[k].append((table.chars[candidates[:, :k]] == want[:, None]).all(-1).any(-1))
            chosen = best_candidate(candidates[:, :k], logits[:, :k])
            reranked[k].append((table.chars[chosen] == want).all(-1))
    entropy, fallback, shipped = torch.cat(entropy), torch.cat(fallback), torch.cat(shipped)
    budgets = {budget: entropy >= torch.quantile(entropy, 1 - budget) for budget in BUDGETS}
    thresholds = torch.quantile(entropy, torch.linspace(0, 1, 201)).tolist()

    def summary(agrees: torch.Tensor) -> dict:
        row = {"no_fallback": float(agrees.float().mean()), "tau_0.22": float((agrees | fallback).float().mean()),
               "tau_0.22_vs_shipped": paired_difference(agrees | fallback, shipped | fallback)}
        for budget, falls in budgets.items():
            row[f"budget_{budget}"] = float((agrees | falls).float().mean())
            row[f"budget_{budget}_vs_shipped"] = paired_difference(agrees | falls, shipped | falls)
        reaching = [float((entropy >= t).float().mean()) for t in thresholds if float(((entropy >= t) | agrees).float().mean()) >= TARGET]
        row[f"fallback_rate_for_{TARGET}"] = min(reaching) if reaching else None
        return row

    result = {"positions": len(shipped), "fallback_rate_at_tau_0.22": float(fallback.float().mean()),
              "shipped": summary(shipped), "rerank": {}}
    for k in KS:
        agrees = torch.cat(reranked[k])
        result["rerank"][str(k)] = {"recall": float(torch.cat(recall[k]).float().mean()), **summary(agrees),
                                    "no_fallback_vs_shipped": paired_difference(agrees, shipped)}
    columns = {}
    for name, agrees in (("shipped", shipped), (f"rerank_{PAIRED_K}", torch.cat(reranked[PAIRED_K]))):
        columns[f"{name}/no_fallback"] = agrees
        for budget, falls in budgets.items():
            columns[f"{name}/budget_{budget}"] = agrees | falls
    return result, columns


def main() -> None:
    out, paths = sys.argv[1], sys.argv[2:]
    document: dict = {"models": paths, "results": {}, "vs_first": {}}
    first: dict[str, dict[str, torch.Tensor]] = {}
    for path in paths:
        model = load(path).eval()
        texts = {"boolq_dev": pack(assets.held_out_texts(), model.tokenizer, 256, max_blocks=32),
                 "out_of_domain": pack(out_of_domain_texts(), model.tokenizer, 256, max_blocks=32)}
        scored = {name: probe(model, blocks) for name, blocks in texts.items()}
        document["results"][path] = {name: result for name, (result, _) in scored.items()}
        if not first:
            first = {name: columns for name, (_, columns) in scored.items()}
        else:
            document["vs_first"][path] = {name: {key: paired_difference(column, first[name][key])
                                                 for key, column in columns.items()}
                                          for name, (_, columns) in scored.items()}
        report(path, document["results"][path])
    json.dump(document, open(out, "w"), indent=2)


def report(path: str, results: dict) -> None:
    for name, result in results.items():
        rows = {"shipped": result["shipped"], **{f"K {k}": row for k, row in result["rerank"].items()}}
        print(f"{path}, {name}: {result['positions']} positions, {result['fallback_rate_at_tau_0.22']:.3f} fall back "
              "at tau 0.22")
        for label, row in rows.items():
            print(f"  {label}: recall {row.get('recall', float('nan')):.4f} no fallback {row['no_fallback']:.4f} "
                  f"tau 0.22 {row['tau_0.22']:.4f} " + " ".join(f"b{b} {row[f'budget_{b}']:.4f}" for b in BUDGETS)
                  + f" fallback for {TARGET}: {row[f'fallback_rate_for_{TARGET}']}")


if __name__ == "__main__":
    main()
