"""Speed against agreement at the operating points a user can choose, on one model in one run.

    python -m bench.operating_points --model SPELLM_DIR [--taus 0 0.1 0.22 0.5 1 none] [--rerank_k 16]
        [--shortlist 1000] [--max_tokens 8192] [--batch 8] [--new_tokens 64] [--repeats 6] [--out FILE]

For each fallback threshold tau, with the paper's decoding and again with each re-ranking asked for
(``--rerank_k`` K: the decided rows re-ranked by the LM head's rows of the heads' K best spellings;
``--shortlist`` U: of the U most frequent tokens and the heads' own; both: the two together):
- on held-out positions (BoolQ dev passages, ``--max_tokens`` of them; :mod:`analysis.collect`):
  the share that falls back to the LM head and the agreement of the decoded token with the
  teacher's top-1 (exact+prefix, AutoCorrect + fallback), with 95% intervals clustered by block;
- in greedy generation (BoolQ dev questions, ``--batch`` prompts, ``--new_tokens`` tokens, EOS
  ignored): tokens/s relative to the same decode loop with the LM head, the ratio taken round by
  round over ``--repeats`` interleaved rounds (median and distribution-free 95% interval), and the
  generated tokens' fallback rate.
The table names the fastest operating point whose agreement is at least 95%.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import add_threads_arg, interleaved_times, median_interval, write
from bench.decode_speed import prompts
from spellm_ds import cli
from spellm_ds.hf.char_decoding import Provenance
from spellm_ds.model.decoding import decode_loop, lm_head_picker, spellm_picker
from spellm_ds.model.spellm import load

TARGET = 0.95
"""The agreement the table looks for the fastest operating point at."""


def taus(text: str) -> float | None:
    return cli.tau(text)


def agreement_by_tau(args: argparse.Namespace, rerank_k: int, shortlist: int) -> dict:
    """Held-out fallback rate and AutoCorrect + fallback agreement at every tau (one collect pass)."""
    from analysis.collect import collect
    from analysis.common import correct_flags, fallback_mask, rate

    analysis = collect(argparse.Namespace(model=args.model, data=None, text_field="text", teacher=None,
                                          max_tokens=args.max_tokens, seq_len=256, batch_size=4, tau=None,
                                          rerank_k=rerank_k, shortlist=shortlist))
    blocks = analysis.blocks()
    found = {}
    for tau in args.taus:
        agree = correct_flags(analysis, "autocorrect_fallback", tau)["exact_or_prefix"]
        found[str(tau)] = {"agreement": rate(agree, blocks), "fallback_rate": rate(fallback_mask(analysis, tau))}
    return found


def main() -> None:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--model", required=True, help="an exported SpeLLM directory")
    parser.add_argument("--taus", nargs="+", type=taus, default=[0.0, 0.1, 0.22, 0.5, 1.0, None],
                        help="fallback thresholds ('none': never fall back) (default: 0 0.1 0.22 0.5 1 none)")
    cli.add_rerank_arg(parser)
    parser.add_argument("--max_tokens", type=cli.positive_int, default=8192, help="held-out positions scored")
    parser.add_argument("--batch", type=cli.positive_int, default=8, help="prompts generated at once")
    parser.add_argument("--new_tokens", type=cli.positive_int, default=64)
    parser.add_argument("--repeats", type=cli.positive_int, default=6, help="interleaved timing rounds (>= 6)")
    add_threads_arg(parser)
    parser.add_argument("--out", type=cli.output_file, default=None, help="JSON file (default: bench/results/)")
    args = parser.parse_args()
    if args.repeats < 6:
        parser.error(f"--repeats {args.repeats}: at least 6 rounds are needed for a 95% interval of the median")
    torch.set_num_threads(args.threads)
    decodings = list(dict.fromkeys([(0, 0), (args.rerank_k, 0), (0, args.shortlist), (args.rerank_k, args.shortlist)]))
    settings = [(tau, *decoding) for decoding in decodings for tau in args.taus]
    quality = {decoding: agreement_by_tau(args, *decoding) for decoding in decodings}
    model = load(args.model, shortlist=args.shortlist)
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    encoded = tokenizer(prompts(args.batch), return_tensors="pt", padding=True)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    generated = {}

    def loop(name: str, pick):
        def run():
            generated[name] = decode_loop(model.base, pick, ids, mask, args.new_tokens).provenance
        return run

    variants = {"lm_head": loop("lm_head", lm_head_picker(model.base))}
    for tau, rerank_k, shortlist in settings:
        variants[f"{tau}/{rerank_k}/{shortlist}"] = loop(f"{tau}/{rerank_k}/{shortlist}", spellm_picker(
            model, model.char_decoder(tau, shortlist), rerank_k=rerank_k))
    times = interleaved_times(variants, args.repeats)
    rows = []
    for tau, rerank_k, shortlist in settings:
        name = f"{tau}/{rerank_k}/{shortlist}"
        speedup = median_interval([lm / own for lm, own in zip(times["lm_head"], times[name])])
        held_out = quality[rerank_k, shortlist][str(tau)]
        rows.append({"tau": tau, "rerank_k": rerank_k, "shortlist": shortlist, "agreement": held_out["agreement"],
                     "fallback_rate": held_out["fallback_rate"], "speed_vs_lm_head": speedup,
                     "generated_fallback_rate": float((generated[name] == Provenance.FALLBACK).float().mean())})
    good = [row for row in rows if row["agreement"]["rate"] >= TARGET]
    best = max(good, key=lambda row: row["speed_vs_lm_head"]["median"]) if good else None
    print(markdown(rows, best))
    write("operating_points", {"model": args.model, "taus": args.taus, "rerank_k": args.rerank_k,
                               "shortlist": args.shortlist,
                               "max_tokens": args.max_tokens, "batch": args.batch, "new_tokens": args.new_tokens,
                               "repeats": args.repeats, "threads": torch.get_num_threads()},
          {"rows": rows, "fastest_at_target": best, "target": TARGET}, args.out)


def markdown(rows: list[dict], best: dict | None) -> str:
    lines = ["| tau | rerank_k | shortlist | fallback (held-out) | agreement with the teacher's top-1 (95% CI) | "
             "speed vs the LM-head loop (95% CI) | fallback (generated) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        a, s = row["agreement"], row["speed_vs_lm_head"]
        lines.append(f"| {row['tau']} | {row['rerank_k']} | {row['shortlist']} | "
                     f"{100 * row['fallback_rate']['rate']:.1f}% | "
                     f"{100 * a['rate']:.1f}% ({100 * a['ci95'][0]:.1f}-{100 * a['ci95'][1]:.1f}) | "
                     f"{s['median']:.2f}x ({s['low']:.2f}-{s['high']:.2f}) | "
                     f"{100 * row['generated_fallback_rate']:.1f}% |")
    lines.append("")
    lines.append(f"fastest at >= {TARGET:.0%} agreement: " + (
        f"tau {best['tau']}, rerank_k {best['rerank_k']}, shortlist {best['shortlist']}: "
        f"{best['speed_vs_lm_head']['median']:.2f}x the LM-head "
        f"loop at {100 * best['agreement']['rate']:.1f}% agreement" if best else "none reaches it"))
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(main)
