"""The copy-context pilot's training text: the default corpus's training documents plus list texts
(``copy_rate.list_text``) of natural words drawn uniformly from every word the corpus holds
(``copy_rate.natural_words``), not by frequency, so the teacher's top-1 is a chosen rare word at
about 16 of every 70 positions. ``--share``: the list texts' share of all tokens, so of any run's
first blocks (the documents are shuffled before packing).

    PYTHONPATH=. .venv/bin/python experiments/2026-12-07-copy-contexts/build_mix.py runs/p53/base-hf runs/copy/mix.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from copy_rate import list_text, natural_words, token_counts

from spellm_ds.data.corpus import training_texts
from spellm_ds.model.spellm import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an export of the teacher (its tokenizer and spelling table)")
    parser.add_argument("out", help="the JSON-lines file to write (field text)")
    parser.add_argument("--share", type=float, default=0.2)
    parser.add_argument("--list_length", type=int, default=16)
    args = parser.parse_args()
    model = load(args.model)
    tokenizer = model.tokenizer
    texts = training_texts()
    seen = token_counts(tokenizer, texts, len(model.spelling_lengths))
    words = natural_words(tokenizer, model.spelling_lengths, seen).tolist()
    natural_tokens = int(seen.sum())
    rng = random.Random(0)
    lists, list_tokens = [], 0
    while list_tokens < args.share / (1 - args.share) * natural_tokens:
        ids, _ = list_text(tokenizer, rng.sample(words, args.list_length))
        lists.append(tokenizer.decode(ids))
        list_tokens += len(ids)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for text in texts + lists:
            f.write(json.dumps({"text": text}) + "\n")
    print(json.dumps({"words": len(words), "natural_documents": len(texts), "natural_tokens": natural_tokens,
                      "lists": len(lists), "list_tokens": list_tokens}))


if __name__ == "__main__":
    main()
