"""Probe: would a per-character length bonus in the vocabulary argmax agree with the teacher more?

    PYTHONPATH=. python experiments/pilots/length_bonus.py runs/smollm2-135m/model experiments/pilots/length-bonus.json

The summed spelling score s(v) reads a token's characters up to its first END only, so a short
token pays for fewer heads than a long one. This scores every valid spelling by s(v) + beta * n(v)
(n: the heads it reads, END included) and compares its argmax with the teacher's top-1 (the LM
head on the same hidden state; the default recipe's student shares it), against the shipped
decoding (the argmax string if it is a token, else AutoCorrect), on three texts: BoolQ dev (the
test text), the default run's own evaluation blocks (where a fit would choose beta) and the
out-of-domain source. "misses only" applies the bonus only where the argmax string is no token.
Budgets send the highest-entropy share of positions to the LM head (counted as agreeing).
Positions whose teacher token is unspellable are left out. It also scores the text's next token
under the distribution the bonus implies, ``p(v) = exp((s(v) + beta * n(v)) / T)`` normalised
over the valid spellings, on a grid of beta and T (mean NLL in nats, at every position and where
the heads decide at tau 0.22), to see whether one (beta, T) fitted by likelihood would serve both.
"""

import json
import sys

import torch

from analysis.common import paired_difference
from spellm_ds.data import assets
from spellm_ds.data.corpus import out_of_domain_texts
from spellm_ds.data.packing import pack
from spellm_ds.distill.config import RunConfig
from spellm_ds.export.export import run_blocks
from spellm_ds.hf.char_decoding import after_first_end
from spellm_ds.model.spellm import load

BETAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
BUDGETS = (0.15, 0.3)
TEMPERATURES = (1.0, 2.0, 2.5, 3.0, 3.36, 4.0)


@torch.no_grad()
def probe(model, blocks: torch.Tensor) -> dict:
    decoder = model.char_decoder(0.22)
    table = decoder.table
    heads_read = (~after_first_end(table.chars[decoder.valid_ids])).sum(-1).float()
    token_heads_read = (~after_first_end(table.chars)).sum(-1).float()  # [V], any token id
    nll_sums = torch.zeros(2, len(BETAS), len(TEMPERATURES), dtype=torch.float64)  # all / decided
    nll_positions = torch.zeros(2, dtype=torch.float64)
    entropy, shipped, fallback = [], [], []
    bonus = {beta: [] for beta in BETAS}
    misses_only = {beta: [] for beta in BETAS}
    for batch in blocks.split(4):
        out = model(input_ids=batch, with_token_logits=True)
        add_next_token_nll(decoder, out.char_logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                           heads_read, token_heads_read, nll_sums, nll_positions)
        char_logits = out.char_logits.flatten(0, 1).float()
        want = out.token_logits.flatten(0, 1).float().argmax(-1)
        spellable = table.spellable[want]
        char_logits, want = char_logits[spellable], table.chars[want[spellable]]
        proposal = decoder.propose(char_logits)
        agrees = (table.chars[proposal.token_ids] == want).all(-1)
        entropy.append(proposal.entropy), shipped.append(agrees), fallback.append(proposal.fallback)
        scores = decoder.spelling_scores(torch.log_softmax(char_logits, -1))
        for beta in BETAS:
            picked = decoder.valid_ids[(scores + beta * heads_read).argmax(-1)]
            good = (table.chars[picked] == want).all(-1)
            bonus[beta].append(good)
            misses_only[beta].append(torch.where(proposal.hit, agrees, good))
    entropy, shipped, fallback = torch.cat(entropy), torch.cat(shipped), torch.cat(fallback)
    decided = ~fallback
    rate = lambda x, where=None: float(x.float().mean() if where is None else x[where].float().mean())  # noqa: E731
    result = {"positions": len(shipped), "decided_at_tau_0.22": int(decided.sum()),
              "shipped": {"all": rate(shipped), "decided": rate(shipped, decided)}, "beta": {}}
    by_budget = {budget: entropy >= torch.quantile(entropy, 1 - budget) for budget in BUDGETS}
    for budget, falls in by_budget.items():
        result["shipped"][f"budget_{budget}"] = rate(falls | shipped)
    for beta in BETAS:
        good, partial = torch.cat(bonus[beta]), torch.cat(misses_only[beta])
        row = {"all": rate(good), "decided": rate(good, decided), "misses_only_all": rate(partial),
               "all_vs_shipped": paired_difference(good, shipped)}
        for budget, falls in by_budget.items():
            row[f"budget_{budget}"] = rate(falls | good)
            row[f"budget_{budget}_vs_shipped"] = paired_difference(falls | good, falls | shipped)
        result["beta"][str(beta)] = row
    nll = nll_sums / nll_positions.view(2, 1, 1)
    result["next_token_nll"] = {
        "positions": int(nll_positions[0]), "decided_positions": int(nll_positions[1]),
        "by_beta_then_temperature": {str(beta): {str(t): {"all": float(nll[0, i, j]), "decided": float(nll[1, i, j])}
                                                 for j, t in enumerate(TEMPERATURES)} for i, beta in enumerate(BETAS)}}
    return result


def add_next_token_nll(decoder, char_logits, targets, heads_read, token_heads_read, sums, positions) -> None:
    spellable = decoder.table.spellable[targets]
    char_logits, targets = char_logits[spellable], targets[spellable]
    decided = ~decoder.propose(char_logits).fallback
    char_logp = torch.log_softmax(char_logits, -1)
    scores, read = decoder.spelling_scores(char_logp), decoder.read_scores(char_logp, targets)
    for i, beta in enumerate(BETAS):
        bonus_scores, bonus_read = scores + beta * heads_read, read + beta * token_heads_read[targets]
        for j, temperature in enumerate(TEMPERATURES):
            nll = torch.logsumexp(bonus_scores / temperature, -1) - bonus_read / temperature
            sums[0, i, j] += nll.double().sum()
            sums[1, i, j] += nll[decided].double().sum()
    positions += torch.tensor([len(targets), int(decided.sum())], dtype=torch.float64)


def main() -> None:
    model = load(sys.argv[1]).eval()
    texts = {
        "boolq_dev": pack(assets.held_out_texts(), model.tokenizer, 256, max_blocks=32),
        "run_eval_blocks": run_blocks(RunConfig(), model.tokenizer).held_out[: RunConfig().eval_blocks],
        "out_of_domain": pack(out_of_domain_texts(), model.tokenizer, 256, max_blocks=32),
    }
    results = {name: probe(model, blocks) for name, blocks in texts.items()}
    json.dump({"model": sys.argv[1], "results": results}, open(sys.argv[2], "w"), indent=2)
    for name, result in results.items():
        shipped = result["shipped"]
        print(f"{name}: {result['positions']} positions; shipped all {shipped['all']:.4f} decided "
              f"{shipped['decided']:.4f} budget 0.15 {shipped['budget_0.15']:.4f}")
        for beta, row in result["beta"].items():
            ci, ci15 = row["all_vs_shipped"]["ci95"], row["budget_0.15_vs_shipped"]["ci95"]
            print(f"  beta {beta}: all {row['all']:.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}] (misses only "
                  f"{row['misses_only_all']:.4f}) decided {row['decided']:.4f} budget 0.15 {row['budget_0.15']:.4f} "
                  f"[{ci15[0]:+.4f}, {ci15[1]:+.4f}] budget 0.3 {row['budget_0.3']:.4f}")
        for beta, curve in result["next_token_nll"]["by_beta_then_temperature"].items():
            print(f"  NLL beta {beta}: " + " ".join(f"T {t}: {v['all']:.3f} / {v['decided']:.3f}"
                                                  for t, v in curve.items()))


if __name__ == "__main__":
    main()
