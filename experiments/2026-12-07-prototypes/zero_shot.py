"""Zero-shot prototype heads (issue 53 item 4): how much of the teacher's top-1 do char heads
built only from the LM head's rows spell, before any training?

Head j's logit for character c is the max of the teacher's logits u_t . h over P prototype tokens
t spelled with c at position j (the P most frequent of them in the training text; all of them
where there are at most P). With every token a prototype, the argmax character of every head is
that of the teacher's top-1, so raw agreement is 100% at k times the LM head's cost; this measures
what fewer rows keep. Scored on the held-out BoolQ dev positions of ``analysis.report``, raw
top-1 (the heads' argmax string = the teacher's top-1), split by the top-1's length and by how
often it occurs in the training text.

    PYTHONPATH=. .venv/bin/python experiments/2026-12-07-prototypes/zero_shot.py MODEL_DIR [--max_tokens 8192]
"""

from __future__ import annotations

import argparse
import json

import torch

from analysis.collect import held_out_blocks
from spellm_ds.data.packing import cached_packing
from spellm_ds.hf.char_decoding import END_ID, read_string
from spellm_ds.hf.char_heads import CharHeads
from spellm_ds.model.spellm import load

BANDS = ((0, 9), (10, 99), (100, 999), (1000, 9999), (10000, None))
LENGTHS = ((1, 1), (2, 2), (3, 4), (5, 5), (6, 6), (7, 8), (9, 99))


def prototype_heads(model, counts: torch.Tensor, per_char: int) -> CharHeads:
    """Heads of ``per_char`` prototypes per (position, char) as ``--prototypes`` starts them, no read-out."""
    d = model.config.get_text_config().hidden_size
    heads = CharHeads(d, model.config.k, len(model.config.charset), prototypes=per_char)
    heads.init_prototypes(model.get_output_embeddings().weight, model.spelling_chars, model.spelling_lengths > 0,
                          counts)
    return heads


def split(flags: torch.Tensor, keys: torch.Tensor, ranges) -> dict[str, dict]:
    out = {}
    for low, high in ranges:
        mask = (keys >= low) if high is None else (keys >= low) & (keys <= high)
        name = f"{low}+" if high is None else f"{low}-{high}"
        out[name] = {"positions": int(mask.sum()), "raw_top1": float(flags[mask].float().mean()) if mask.any() else None}
    return out


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--max_tokens", type=int, default=8192)
    parser.add_argument("--per_char", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--out", default="experiments/2026-12-07-prototypes/zero_shot.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load(args.model)
    tokenizer, chars, lengths = model.tokenizer, model.spelling_chars, model.spelling_lengths
    vocab, k = chars.shape
    train = cached_packing(None, "text", tokenizer, 256, 0.02, 0, None).train  # the default corpus's blocks
    counts = torch.bincount(train.flatten(), minlength=vocab)
    lm_head = model.get_output_embeddings()
    hidden = torch.cat([model.base.get_decoder()(block[None]).last_hidden_state[0]
                        for block in held_out_blocks(tokenizer, None, "text", 256, args.max_tokens)])
    logits = lm_head(hidden).float()
    teacher = logits.argmax(-1)
    target = chars[teacher].masked_fill(torch.arange(k) >= lengths[teacher, None] + 1, END_ID)
    trained = read_string(model.char_heads(hidden))
    results = {"model": args.model, "positions": len(teacher), "vocab": vocab,
               "trained_heads": {"raw_top1": float((trained == target).all(-1).float().mean())}}
    for per_char in args.per_char:
        heads = prototype_heads(model, counts, per_char)
        spelled = torch.cat([read_string(heads(chunk)) for chunk in hidden.split(512)])
        exact = (spelled == target).all(-1)
        real_rows = int((~heads.empty_slots).sum())
        results[f"P={per_char}"] = {
            "rows": real_rows, "rows_over_lm_head": real_rows / vocab, "raw_top1": float(exact.float().mean()),
            "by_length": split(exact, lengths[teacher], LENGTHS),
            "by_training_count": split(exact, counts[teacher], BANDS)}
        print(per_char, real_rows / vocab, float(exact.float().mean()), flush=True)
    with open(args.out, "w") as file:
        json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
