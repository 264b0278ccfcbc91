"""The copy-context pilot's training text: the default corpus's training documents plus list texts
(``spellm_ds.data.copy_lists.list_text``) of words drawn uniformly from every word the corpus
holds (``spellm_ds.data.copy_lists.word_tokens``), not by frequency, so the teacher's top-1 is a
chosen rare word at about 16 of every 70 positions. ``--share``: the list texts' share of all
tokens, so of any run's first blocks (the documents are shuffled before packing). The pilot that
led to ``--copy_lists``, which packs lists into blocks of their own instead (an exact share of
every run's first blocks).

    PYTHONPATH=. .venv/bin/python experiments/2026-12-07-copy-contexts/build_mix.py runs/copy/mix.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from spellm_ds.data import assets
from spellm_ds.data.copy_lists import LIST_LENGTH, list_text, word_tokens
from spellm_ds.data.corpus import training_texts
from spellm_ds.data.packing import token_counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the JSON-lines file to write (field text)")
    parser.add_argument("--share", type=float, default=0.2)
    args = parser.parse_args()
    tokenizer = assets.load_tokenizer(assets.embedded_model_dir())
    texts = training_texts()
    counts = token_counts(tokenizer, texts, len(tokenizer))
    words, natural_tokens = word_tokens(tokenizer, counts), int(counts.sum())
    rng = random.Random(0)
    lists, list_tokens = [], 0
    while list_tokens < args.share / (1 - args.share) * natural_tokens:
        lists.append(list_text(rng.sample(words, LIST_LENGTH)))
        list_tokens += len(tokenizer(lists[-1], add_special_tokens=False)["input_ids"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for text in texts + lists:
            f.write(json.dumps({"text": text}) + "\n")
    print(json.dumps({"words": len(words), "natural_documents": len(texts), "natural_tokens": natural_tokens,
                      "lists": len(lists), "list_tokens": list_tokens}))


if __name__ == "__main__":
    main()
