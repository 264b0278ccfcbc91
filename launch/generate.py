"""Generate text with a SpeLLM model's character heads.

    python launch/generate.py --model DIR --prompt "The capital of France is" [--chat] [--tau 0.22] [--rerank_k 16] \
        [--shortlist 1000]

Prints the continuation of each prompt, then how many tokens were exact char-head hits,
AutoCorrect repairs, LM-head fallbacks and (with --rerank_k or --shortlist) LM-head re-rankings.
"""

from __future__ import annotations

import json

import torch

from spellm_ds import cli
from spellm_ds.errors import SpellmError
from spellm_ds.model.decoding import generate
from spellm_ds.model.spellm import load


def main() -> None:
    p = cli.ArgumentParser(__doc__)
    p.add_argument("--model", required=True, help="an exported SpeLLM directory")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    cli.add_tau_arg(p)
    cli.add_rerank_arg(p)
    p.add_argument("--max_new_tokens", type=cli.positive_int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=cli.positive_float, default=1.0)
    p.add_argument("--top_k", type=cli.non_negative_int, default=0, help="0: no top-k cut (default: %(default)s)")
    p.add_argument("--top_p", type=cli.probability, default=1.0, help="nucleus mass in (0, 1] (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")
    cli.add_device_args(p)
    args = p.parse_args()
    if args.sample and args.rerank_k:
        raise SpellmError("--rerank_k re-ranks greedy decoding only; drop --sample or --rerank_k")
    model = load(args.model, dtype=args.dtype, device=args.device, shortlist=args.shortlist)
    tokenizer = model.tokenizer
    if args.chat and not tokenizer.chat_template:
        raise SpellmError(f"{args.model} has no chat template; drop --chat")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True) if args.chat else text
               for text in args.prompt]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not args.chat)
    if (empty := [text for text, mask in zip(args.prompt, batch["attention_mask"]) if not mask.any()]):
        raise SpellmError(f"--prompt {empty[0]!r} has no tokens; pass some text")
    batch = batch.to(args.device)
    out = generate(model, batch["input_ids"], batch["attention_mask"], args.max_new_tokens, args.tau,
                   do_sample=args.sample,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   generator=torch.Generator().manual_seed(args.seed), rerank_k=args.rerank_k,
                   shortlist=args.shortlist)
    texts = [tokenizer.decode(row[row_origin >= 0], skip_special_tokens=True)
             for row, row_origin in zip(out.sequences, out.provenance)]
    if args.json:
        print(json.dumps({"prompts": args.prompt, "completions": texts, "provenance": out.counts()}, indent=2))
        return
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt!r} -> {text!r}")
    print("provenance: " + ", ".join(f"{name} {count}" for name, count in out.counts().items()))


if __name__ == "__main__":
    cli.run(main)
