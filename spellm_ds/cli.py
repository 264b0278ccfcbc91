"""Shared pieces of the command-line entry points (``launch/``, ``analysis/``, ``bench/``).

Nothing here reads ``sys.argv``: entry points build their parsers from these helpers and hand
their ``main`` to :func:`run`, which turns a :class:`SpellmError` into one line and exit code 2.
A bad flag value is such an error too (:class:`ArgumentParser`), caught before any model loads.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from spellm_ds.errors import SpellmError, first_line

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
        if not check(value) or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a positive number")
probability = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
_non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0 or 'none'")


def tau(text: str) -> float | None:
    """The fallback threshold: a mean head entropy >= 0, or ``none`` (never fall back)."""
    return None if text.lower() == "none" else _non_negative_float(text)


def add_tau_arg(parser: argparse.ArgumentParser) -> None:
    from spellm_ds.hf.char_decoding import DEFAULT_TAU

    parser.add_argument("--tau", type=tau, default=DEFAULT_TAU,
                        help="fall back to the LM head at this mean head entropy (nats); 'none' never falls back "
                             "(default: %(default)s)")


def add_rerank_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rerank_k", type=non_negative_int, default=0,
                        help="beyond the paper: where the char heads decide, emit the best of their top-K valid "
                             "spellings by the LM head's logits (K of its rows), and score a next token among them "
                             "by the heads' mass of the K shared by the LM head's softmax; 0 is the paper's "
                             "decoding (default: %(default)s)")
    parser.add_argument("--shortlist", type=non_negative_int, default=0, metavar="U",
                        help="beyond the paper: where the char heads decide, the LM head also scores the U tokens "
                             "most frequent in the text the heads trained on (U of its rows), beside the token "
                             "the heads spell (no AutoCorrect) or their --rerank_k best, and the best is emitted "
                             "and scored as --rerank_k does; 0: off (default: %(default)s)")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_args(parser: argparse.ArgumentParser) -> None:
    from spellm_ds.runtime.precision import INFERENCE_DTYPES

    parser.add_argument("--device", type=device, default=default_device(),
                        help="where the models run, e.g. cpu, cuda, cuda:1 (default: %(default)s)")
    parser.add_argument("--dtype", choices=("auto", *INFERENCE_DTYPES), default="auto",
                        help="the models' dtype; auto: the model's own where the device computes it fast, else "
                             "float32 (default: %(default)s)")


def _file_above(path: Path) -> Path | None:
    """The first folder of ``path`` that is a file (so nothing can be written there), if any."""
    return next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)


def check_output_dir(path: str | Path, flag: str, empty: bool = False) -> Path:
    """Refuse an output directory that is a file or lies under one (or, with ``empty``, one that
    holds files) before any work is done."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SpellmError(f"{flag} {path} is a file; pass a directory")
    if (blocking := _file_above(path)) is not None:
        raise SpellmError(f"{flag} {path} lies under {blocking}, which is a file; pass another directory")
    if empty and path.is_dir() and any(path.iterdir()):
        raise SpellmError(f"{flag} {path} exists and is not empty; choose a new directory")
    return path


def output_file(text: str) -> Path:
    """An ``--out`` file (``type=`` of the flag, so it is checked before any work): not a
    directory, and not under a file."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; pass a file path")
    if (blocking := _file_above(path)) is not None:
        raise argparse.ArgumentTypeError(f"{text} lies under {blocking}, which is a file; pass another path")
    return path


def device(text: str) -> str:
    """A torch device string (``cpu``, ``cuda``, ``cuda:1``) this machine has."""
    import torch

    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:N)") from None
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return text


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list[str]": list}


def option_type(annotation: str) -> tuple[type, bool]:
    """The base type of a declared option's annotation (a string under postponed annotations) and
    whether it may be None."""
    name, _, none = annotation.partition(" | ")
    return _TYPES[name], none == "None"


def add_options(parser: argparse.ArgumentParser, config_class, names: tuple[str, ...] | None = None) -> None:
    """One ``--name`` per option declared in ``config_class`` (:func:`spellm_ds.distill.config.option`), or
    per one of ``names``, in the declaration's ``--help`` groups: booleans as ``--x``/``--no-x``,
    lists as zero or more values."""
    from spellm_ds.distill.config import GROUPS

    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for declared in fields(config_class):
        if "help" not in declared.metadata or (names is not None and declared.name not in names):
            continue
        settings = {key: value for key, value in declared.metadata.items() if key not in ("help", "group")}
        kind, _ = option_type(declared.type)
        help_text = declared.metadata["help"]
        if kind is bool:
            settings["action"] = argparse.BooleanOptionalAction  # it states the default itself
        elif kind is list:
            settings["nargs"] = "*"
        else:
            settings["type"] = kind
            if declared.default is not None and "(default" not in help_text:
                help_text += " (default: %(default)s)"
        groups[declared.metadata["group"]].add_argument(f"--{declared.name}", default=declared.default,
                                                        help=help_text, **settings)


def read_recipe(path: str | Path, config_class) -> dict[str, Any]:
    """A recipe file (YAML): option names of ``config_class`` and their values, each checked
    against the option's type; a bad file is one line naming the problem."""
    import yaml

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpellmError(f"recipe file {path} does not exist; pass an existing YAML file with --config") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SpellmError(f"recipe file {path} is not readable YAML ({first_line(e)}); fix it") from None
    if not isinstance(values, dict):
        raise SpellmError(f"recipe file {path} must map option names to values (name: value per line)")
    declared = {f.name: f for f in fields(config_class) if "help" in f.metadata}
    for name, value in values.items():
        if name not in declared:
            raise SpellmError(f"recipe file {path}: unknown option {name!r}; see --help for the options")
        kind, optional = option_type(declared[name].type)
        fits = (value is None and optional) or (kind is float and isinstance(value, (int, float))
                                                and not isinstance(value, bool)) \
            or (kind is int and isinstance(value, int) and not isinstance(value, bool)) \
            or (kind is list and isinstance(value, list) and all(isinstance(v, str) for v in value)) \
            or (kind in (str, bool) and isinstance(value, kind))
        if not fits:
            raise SpellmError(f"recipe file {path}: {name} is {value!r}, not a {declared[name].type}; fix the value")
    return values


def add_model_and_data_args(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--data`` and ``--text_field`` as the run declares them."""
    from spellm_ds.distill.config import RunConfig

    add_options(parser, RunConfig, ("model", "data", "text_field"))


KNOWN_NOISE = (r"`torch\.distributed\.\w+` is deprecated", r"Attempting to get learning rate from scheduler before",
               r"`use_cache=True` is incompatible with gradient checkpointing")
"""Third-party messages a run prints at every start or step that tell its user nothing."""


def quiet_known_noise() -> None:
    """Silence :data:`KNOWN_NOISE` (Python warnings and DeepSpeed's log), DeepSpeed's note that it
    picked the CPU where no GPU is there, and transformers' weight-loading progress bars, which fill
    a log with carriage returns. Called once per process, before DeepSpeed is imported."""
    import logging
    import os
    import re
    import warnings

    import torch

    for pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not sys.stderr.isatty():  # progress bars in a log file are one endless line of carriage returns
        os.environ.setdefault("TQDM_DISABLE", "1")

    def useful(record: logging.LogRecord) -> bool:
        return not any(re.match(pattern, record.getMessage()) for pattern in KNOWN_NOISE)

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").addFilter(useful)
    for handler in transformers_logging._get_library_root_logger().handlers:
        handler.addFilter(useful)


def run(main: Callable[[], int | None]) -> None:
    """Call ``main`` and exit with its code; user errors print one line and exit 2."""
    quiet_known_noise()
    try:
        code = main()
    except SpellmError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    sys.exit(code or 0)
