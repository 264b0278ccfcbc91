"""Spelling coverage report: how much of a tokenizer's vocabulary and corpus k characters cover.

    python launch/spelling_report.py --k 5 10 15 [--model DIR] [--data FILES] [--json]
"""

from __future__ import annotations

import argparse
import json

from spellm_ds import cli
from spellm_ds.data import assets
from spellm_ds.data.packing import load_texts, token_counts
from spellm_ds.model import loading as model_loading
from spellm_ds.model.charset import Charset
from spellm_ds.model.spelling import SpellingTable, model_vocab_size

COLUMNS = ("exactly_spellable", "truncated", "unspellable", "shadowed_tokens", "corpus_exactly_spellable")


def parse_args() -> argparse.Namespace:
    parser = cli.ArgumentParser(__doc__)
    cli.add_model_and_data_args(parser)
    parser.add_argument("--k", type=cli.positive_int, nargs="+", default=[10], help="spelling lengths to compare (default: 10)")
    parser.add_argument("--charset", default=None, help="charset.json or a text file of extra characters")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    model_dir = assets.resolve_model(args.model)
    tokenizer = assets.load_tokenizer(model_dir)
    charset = Charset.from_file(args.charset) if args.charset else Charset.default()
    vocab_size = model_vocab_size(model_loading.load_config(model_dir))
    counts = token_counts(tokenizer, load_texts(args.data, args.text_field)["text"], vocab_size)
    rows = [SpellingTable.from_tokenizer(tokenizer, charset, k, vocab_size).stats(counts) for k in args.k]
    if args.json:
        print(json.dumps({"model": args.model, "reports": rows}, indent=2))
        return
    print(f"model {args.model}: vocab {rows[0]['vocab_size']}, charset {rows[0]['charset_size']} symbols, "
          f"corpus {rows[0]['corpus_tokens']} tokens")
    print("| k | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for row in rows:
        cells = [f"{row[c]:.2%}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
        print(f"| {row['k']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    cli.run(main)
