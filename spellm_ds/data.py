"""Text loading through the ``datasets`` library.

Accepted ``--data`` inputs: ``.txt`` files (one document per blank-line-separated paragraph),
``.jsonl``/``.json`` and ``.parquet`` files (documents in ``text_field``), and directories written
by ``datasets.save_to_disk``. With no paths, the default corpus (:mod:`spellm_ds.assets`).
Every input is checked up front so a bad file fails with one clear line, not deep inside a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets

from spellm_ds import assets
from spellm_ds.errors import SpellmError

TEXT_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _check_text_file(path: Path) -> None:
    head = path.open("rb").read(1 << 16)
    if not head.strip():
        raise SpellmError(f"data file {path} is empty; remove it from --data")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        # A multi-byte character cut at the end of the sample is fine; anything earlier is not.
        if e.start < len(head) - 4:
            raise SpellmError(f"data file {path} is not UTF-8 text (binary?); pass text, jsonl or parquet files") from None
    if b"\x00" in head:
        raise SpellmError(f"data file {path} is not UTF-8 text (binary?); pass text, jsonl or parquet files")


def _load_one(path: Path, text_field: str) -> datasets.Dataset:
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise SpellmError(f"data directory {path} is not a datasets.save_to_disk directory; "
                              "pass files or save the dataset with save_to_disk") from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise SpellmError(f"dataset {path} has splits {list(loaded)} but no 'train'; save one split")
            loaded = loaded["train"]
        dataset = loaded
    else:
        builder = TEXT_SUFFIXES.get(path.suffix)
        if builder is None:
            raise SpellmError(f"data file {path} has an unknown type; use {', '.join(TEXT_SUFFIXES)} files")
        if builder != "parquet":
            _check_text_file(path)
        try:
            kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        except Exception as e:  # datasets wraps parser errors in many types
            raise SpellmError(f"could not read data file {path}: {str(e).splitlines()[0]}") from None
    field = "text" if path.suffix == ".txt" else text_field
    if field not in dataset.column_names:
        raise SpellmError(
            f"{path} has no field {field!r} (fields: {', '.join(dataset.column_names)}); choose one with --text_field"
        )
    dataset = dataset.select_columns([field])
    if field != "text":
        dataset = dataset.rename_column(field, "text")
    if len(dataset) == 0:
        raise SpellmError(f"data file {path} holds no documents; remove it from --data")
    return dataset


def load_texts(paths: Sequence[str] | None = None, text_field: str = "text") -> datasets.Dataset:
    """One ``text`` column of non-empty documents from ``paths``, or the default corpus."""
    if not paths:
        return datasets.Dataset.from_dict({"text": assets.default_corpus_texts()})
    parts = []
    for name in paths:
        path = Path(name)
        if not path.exists():
            raise SpellmError(f"data path {path} does not exist; pass existing files or directories with --data")
        parts.append(_load_one(path, text_field))
    dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    dataset = dataset.filter(lambda row: isinstance(row["text"], str) and bool(row["text"].strip()))
    if len(dataset) == 0:
        raise SpellmError(f"no non-empty documents in {', '.join(paths)}; check --data and --text_field")
    return dataset
