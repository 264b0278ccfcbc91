"""Free-running agreement: greedy continuations of fixed prompts, teacher vs SpeLLM.

    python -m analysis.free_running --model DIR [--data FILE] [--prompts 50] [--new_tokens 64] [--tau 0.22] \\
        [--rerank_k 16] [--shortlist 1000] --out free_running.json

The match rates are teacher-forced: every position is scored from the teacher's own context. A
converted model that generates feeds on its own tokens, so one early difference changes all that
follows. For each of ``--prompts`` fixed prompts (the first ``--prompt_tokens`` tokens of as many
held-out documents) this compares the teacher's greedy continuation with the SpeLLM model's,
``raw`` (char heads and AutoCorrect, no fallback) and ``autocorrect_fallback`` (fallback at tau):
the share of identical continuations and the mean number of tokens before the first divergence.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from analysis.collect import held_out_texts
from spellm_ds import cli
from spellm_ds.distill.metrics import Z_95
from spellm_ds.errors import SpellmError
from spellm_ds.hf import SpeLLMForCausalLM
from spellm_ds.model.decoding import decode_loop, generate, lm_head_picker
from spellm_ds.model.spellm import load, load_teacher


def prompts(tokenizer, texts: list[str], count: int, length: int) -> torch.Tensor:
    """The first ``length`` tokens of the first ``count`` documents that have that many: ``[count, length]``."""
    rows = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == count:
            return torch.tensor(rows)
    raise SpellmError(f"only {len(rows)} held-out documents have {length} tokens; lower --prompts or "
                      "--prompt_tokens, or pass more text with --data")


def agreed_tokens(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Leading tokens two continuations share, per row: ``[n, T]`` x 2 -> ``[n]``."""
    return (reference == candidate).long().cumprod(-1).sum(-1)


def agreement(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    agreed = agreed_tokens(reference, candidate).double()
    n, length = reference.shape
    mean = float(agreed.mean())
    half = Z_95 * float(agreed.std()) / math.sqrt(n) if n > 1 else 0.0
    return {"identical": float((agreed == length).double().mean()), "mean_agreed_tokens": mean,
            "mean_agreed_ci95": [mean - half, mean + half], "agreed_tokens": agreed.long().tolist()}


@torch.no_grad()
def compute(student: SpeLLMForCausalLM, teacher, prompt_ids: torch.Tensor, new_tokens: int,
            tau: float | None, rerank_k: int = 0, shortlist: int = 0) -> dict:
    """Teacher vs SpeLLM greedy continuations of ``prompt_ids`` (equal-length prompts, no padding);
    ``rerank_k`` and ``shortlist`` re-rank the char heads' tokens in both variants."""
    eos = student.tokenizer.eos_token_id
    reference = decode_loop(teacher, lm_head_picker(teacher), prompt_ids, None, new_tokens, eos).sequences
    result: dict = {"prompts": len(prompt_ids), "prompt_tokens": prompt_ids.shape[1], "new_tokens": new_tokens,
                    "tau": tau, "rerank_k": rerank_k, "shortlist": shortlist}
    for variant, variant_tau in (("raw", None), ("autocorrect_fallback", tau)):
        out = generate(student, prompt_ids, max_new_tokens=new_tokens, tau=variant_tau, rerank_k=rerank_k,
                       shortlist=shortlist)
        sequences = torch.nn.functional.pad(out.sequences, (0, reference.shape[1] - out.sequences.shape[1]),
                                            value=eos if eos is not None else -1)
        result[variant] = {**agreement(reference, sequences), "provenance": out.counts(),
                           "example": student.tokenizer.decode(sequences[0])}
    result["teacher_example"] = student.tokenizer.decode(reference[0])
    result["prompt_example"] = student.tokenizer.decode(prompt_ids[0])
    return result


def main() -> None:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--model", required=True, help="an exported SpeLLM directory")
    parser.add_argument("--teacher", default=None, help="override the teacher recorded in the SpeLLM directory")
    parser.add_argument("--data", nargs="*", default=None, metavar="FILE",
                        help="held-out text (default: BoolQ dev passages)")
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--prompts", type=cli.positive_int, default=50, help="prompts (default: %(default)s)")
    parser.add_argument("--prompt_tokens", type=cli.positive_int, default=32,
                        help="tokens per prompt (default: %(default)s)")
    parser.add_argument("--new_tokens", type=cli.positive_int, default=64,
                        help="greedy tokens per continuation (default: %(default)s)")
    cli.add_tau_arg(parser)
    cli.add_rerank_arg(parser)
    cli.add_device_args(parser)
    parser.add_argument("--out", type=cli.output_file, required=True, help="JSON report path")
    args = parser.parse_args()
    print(json.dumps(summary(run(args)), indent=2))


def run(args: argparse.Namespace) -> dict:
    """Free-running agreement of ``args.model`` with its teacher, written to ``args.out``."""
    student = load(args.model, dtype=args.dtype, device=args.device, shortlist=args.shortlist)
    teacher = load_teacher(student, args.teacher)
    prompt_ids = prompts(student.tokenizer, held_out_texts(args.data, args.text_field), args.prompts,
                         args.prompt_tokens).to(args.device)
    result = compute(student, teacher, prompt_ids, args.new_tokens, args.tau, args.rerank_k, args.shortlist)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def summary(result: dict) -> dict:
    return {variant: {key: result[variant][key] for key in ("identical", "mean_agreed_tokens", "mean_agreed_ci95")}
            for variant in ("raw", "autocorrect_fallback")}


if __name__ == "__main__":
    cli.run(main)
