"""Shared pieces of the command-line entry points (``launch/``, ``analysis/``).

Nothing here reads ``sys.argv``: entry points build their parsers from these helpers and hand
their ``main`` to :func:`run`, which turns a :class:`SpellmError` into one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from spellm_ds.assets import EMBEDDED_MODEL
from spellm_ds.errors import SpellmError

USER_ERROR_EXIT = 2


def add_model_and_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=EMBEDDED_MODEL,
                        help=f"'{EMBEDDED_MODEL}' (the embedded SmolLM2-135M-Instruct) or a local HF model directory "
                             "(default: %(default)s)")
    parser.add_argument("--data", nargs="*", default=None, metavar="PATH",
                        help=".txt/.jsonl/.json/.parquet files or datasets.save_to_disk directories "
                             "(default: the embedded BoolQ passages)")
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
