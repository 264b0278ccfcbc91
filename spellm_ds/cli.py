"""Shared pieces of the command-line entry points (``launch/``, ``analysis/``, ``bench/``).

Nothing here reads ``sys.argv``: entry points build their parsers from these helpers and hand
their ``main`` to :func:`run`, which turns a :class:`SpellmError` into one line and exit code 2.
A bad flag value is such an error too (:class:`ArgumentParser`), caught before any model loads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from spellm_ds.assets import EMBEDDED_MODEL
from spellm_ds.errors import SpellmError

USER_ERROR_EXIT = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one ``error:`` line (through :func:`run`) rather than usage + error."""

    def __init__(self, description: str | None = None, **kwargs) -> None:
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message: str):
        raise SpellmError(f"{message}; see {self.prog} --help")


def _number(kind: type, check: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a positive number")
probability = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
_non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0 or 'none'")


def tau(text: str) -> float | None:
    """The fallback threshold: a mean head entropy >= 0, or ``none`` (never fall back)."""
    return None if text.lower() == "none" else _non_negative_float(text)


def add_tau_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tau", type=tau, default=0.22,
                        help="fall back to the LM head at this mean head entropy (nats); 'none' never falls back "
                             "(default: %(default)s)")


def add_rerank_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rerank_k", type=non_negative_int, default=0,
                        help="beyond the paper: where the char heads decide, emit the best of their top-K valid "
                             "spellings by the LM head's logits (K of its rows), and score a next token among them "
                             "by the heads' mass of the K shared by the LM head's softmax; 0 is the paper's "
                             "decoding (default: %(default)s)")


def check_output_dir(path: str | Path, flag: str, empty: bool = False) -> Path:
    """Refuse an output directory that is a file or lies under one (or, with ``empty``, one that
    holds files) before any work is done."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SpellmError(f"{flag} {path} is a file; pass a directory")
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise SpellmError(f"{flag} {path} lies under {blocking}, which is a file; pass another directory")
    if empty and path.is_dir() and any(path.iterdir()):
        raise SpellmError(f"{flag} {path} exists and is not empty; choose a new directory")
    return path


def add_model_and_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=EMBEDDED_MODEL,
                        help=f"'{EMBEDDED_MODEL}' (the embedded SmolLM2-135M-Instruct), a local HF model directory or a "
                             "Hub ID org/name[@revision] (through the Hugging Face cache) "
                             "(default: %(default)s)")
    parser.add_argument("--data", nargs="*", default=None, metavar="PATH",
                        help=".txt/.jsonl/.json/.parquet files or datasets.save_to_disk directories "
                             "(default: the built-in five-source English corpus, spellm_ds/corpus.py)")
    parser.add_argument("--text_field", default="text",
                        help="field holding the text in .jsonl/.json/.parquet/dataset inputs (default: %(default)s)")


def run(main: Callable[[], int | None]) -> None:
    """Call ``main`` and exit with its code; user errors print one line and exit 2."""
    try:
        code = main()
    except SpellmError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    sys.exit(code or 0)
