"""Text loading through the ``datasets`` library.

Accepted ``--data`` inputs: ``.txt`` files (one document per blank-line-separated paragraph),
``.jsonl``/``.json`` and ``.parquet`` files (documents in ``text_field``), and directories written
by ``datasets.save_to_disk``. With no paths, the default corpus (:mod:`spellm_ds.data.corpus`).
Every input is checked up front so a bad file fails with one clear line, not deep inside a run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from spellm_ds.data import corpus
from spellm_ds.data.copy_lists import with_copy_lists
from spellm_ds.data.text_overlap import without_shared_sentences
from spellm_ds.errors import SpellmError, first_line
from spellm_ds.runtime.provenance import content_hash

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
            raise SpellmError(f"could not read data file {path}: {first_line(e)}") from None
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
        return datasets.Dataset.from_dict({"text": corpus.training_texts()})
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


# ---------------------------------------------------------------------------- packing
@dataclass
class PackedData:
    """Token blocks of ``seq_len``: training blocks and held-out evaluation blocks.

    Documents are split into train and held-out *before* packing, so no held-out document
    contributes a single token to training.
    """

    train: torch.Tensor  # [N, seq_len] int64
    held_out: torch.Tensor  # [M, seq_len] int64


def pack(texts: list[str], tokenizer, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Documents joined by EOS into ``[n, seq_len]`` blocks (a partial last block is dropped);
    with ``max_blocks``, tokenising stops once that many blocks are full."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for start in range(0, len(texts), 1000):
        for ids in tokenizer(texts[start : start + 1000], add_special_tokens=False)["input_ids"]:
            stream += ids + separator
        if max_blocks is not None and len(stream) >= max_blocks * seq_len:
            break
    n_blocks = len(stream) // seq_len if max_blocks is None else min(len(stream) // seq_len, max_blocks)
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.int64).view(n_blocks, seq_len)


def token_counts(tokenizer, texts: list[str], vocab_size: int) -> torch.Tensor:
    """``[vocab_size]`` int64: how often each token id occurs in ``texts``."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for start in range(0, len(texts), 1000):
        for ids in tokenizer(texts[start : start + 1000], add_special_tokens=False)["input_ids"]:
            counts += torch.bincount(torch.tensor(ids, dtype=torch.int64), minlength=vocab_size)[:vocab_size]
    return counts


def split_documents(texts: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(training, held-out) documents: shuffled by ``seed``, ``eval_fraction`` of them held out."""
    if len(texts) < 2:
        raise SpellmError("the data has a single document; a held-out split needs at least 2 (add documents)")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, round(len(texts) * eval_fraction))
    return [texts[i] for i in order[n_eval:]], [texts[i] for i in order[:n_eval]]


PIECE_CHARS = 4000
"""Training documents are cut into pieces of about this many characters (about four 256-token
blocks of English) before they are shuffled."""


def shuffled_pieces(texts: list[str], seed: int) -> list[str]:
    """``texts`` cut at line ends into pieces of at most ``PIECE_CHARS`` characters (a longer line
    stays whole), shuffled by ``seed``: the first blocks of any length are then a random sample of
    the text. Shuffling whole documents is not: where a few documents are long (42 Shakespeare
    works are 23% of the training split), a run's first 1,700 blocks held 47% Shakespeare."""
    pieces = []
    for text in texts:
        piece: list[str] = []
        size = 0
        for line in text.split("\n"):
            if piece and size + len(line) > PIECE_CHARS:
                pieces.append("\n".join(piece))
                piece, size = [], 0
            piece.append(line)
            size += len(line) + 1
        pieces.append("\n".join(piece))
    order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pieces[i] for i in order]


def pack_documents(texts: list[str], tokenizer, seq_len: int, eval_fraction: float, seed: int,
                   max_train_blocks: int | None = None, copy_lists: float = 0.0) -> PackedData:
    """Split the documents (:func:`split_documents`), drop training documents that share a long
    sentence with a held-out one (:func:`without_shared_sentences`), cut the rest into shuffled
    pieces (:func:`shuffled_pieces`), pack both; with ``max_train_blocks``, only the first that
    many training blocks (a random sample of the training text, for runs that repeat passes over
    less of it); with ``copy_lists``, that share of the training blocks are list texts of the
    training documents' words (:mod:`spellm_ds.data.copy_lists`; held-out blocks stay natural text)."""
    train_texts, held_out_texts = split_documents(texts, eval_fraction, seed)
    held_out = pack(held_out_texts, tokenizer, seq_len)
    train_texts = shuffled_pieces(without_shared_sentences(train_texts, held_out_texts), seed)
    train = pack(train_texts, tokenizer, seq_len, max_train_blocks)
    if copy_lists:
        counts = token_counts(tokenizer, train_texts, len(tokenizer))
        train = with_copy_lists(train, counts, tokenizer, copy_lists, max_train_blocks, seed)
    for name, blocks in (("training", train), ("held-out", held_out)):
        if len(blocks) == 0:
            raise SpellmError(f"the {name} documents are shorter than one {seq_len}-token block; "
                              "add data, lower --seq_len or change --eval_fraction")
    return PackedData(train, held_out)


def epoch_order(num_blocks: int, epoch: int, seed: int) -> torch.Tensor:
    """The order training blocks are read in during ``epoch``: a fresh seeded permutation each pass."""
    return torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def step_rows(num_blocks: int, step: int, micro_step: int, grad_accum: int, micro_batch: int,
              rank: int, world_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's micro-batch for (step, micro_step) as (block indices, the pass each is read in):
    a pure function of the position, so a resumed run reads exactly the blocks the uninterrupted
    run would have read. Ranks take disjoint slices of each pass's order (:func:`epoch_order`)."""
    first = ((step * grad_accum + micro_step) * world_size + rank) * micro_batch
    positions = torch.arange(first, first + micro_batch)
    epochs, offsets = positions // num_blocks, positions % num_blocks
    rows = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        rows[epochs == epoch] = epoch_order(num_blocks, epoch, seed)[offsets[epochs == epoch]]
    return rows, epochs


def first_read_steps(num_blocks: int, blocks_per_step: int, seed: int) -> torch.Tensor:
    """The step at which each training block is first read (in the first pass), ``blocks_per_step``
    being micro batch x accumulation x ranks: what a rank can know of every other rank's reads."""
    steps = torch.empty(num_blocks, dtype=torch.int64)
    steps[epoch_order(num_blocks, 0, seed)] = torch.arange(num_blocks) // blocks_per_step
    return steps


# ---------------------------------------------------------------------------- packed once
PACKING_VERSION = 2
"""Bumped when packing changes what it writes for the same inputs."""


def data_files(paths: Sequence[str] | None) -> list[Path]:
    """The files whose bytes ``--data`` reads (a dataset directory's every file; the default corpus's file)."""
    if not paths:
        return [corpus.corpus_dir() / "train.jsonl"]
    files = []
    for name in paths:
        path = Path(name)
        if not path.exists():
            raise SpellmError(f"data path {path} does not exist; pass existing files or directories with --data")
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return files


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary and rules (what token ids text becomes)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{rules}|eos={tokenizer.eos_token_id}".encode()).hexdigest()


def packing_key(paths: Sequence[str] | None, text_field: str, tokenizer, seq_len: int, eval_fraction: float,
                seed: int, max_train_blocks: int | None, copy_lists: float) -> dict:
    """Everything packed blocks depend on: the data's content, the tokenizer and the packing settings."""
    return {"version": PACKING_VERSION, "data_sha256": content_hash(data_files(paths)), "text_field": text_field,
            "tokenizer_sha256": tokenizer_hash(tokenizer), "seq_len": seq_len, "eval_fraction": eval_fraction,
            "seed": seed, "max_train_blocks": max_train_blocks, "copy_lists": copy_lists}


def packed_dir(key: dict) -> Path:
    """Where blocks of ``key`` are cached: ``$SPELLM_CACHE/packed/<hash of the key>``."""
    from spellm_ds.data import assets

    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return assets.cache_root() / "packed" / name


def cached_packing(paths: Sequence[str] | None, text_field: str, tokenizer, seq_len: int, eval_fraction: float,
                   seed: int, max_train_blocks: int | None = None, copy_lists: float = 0.0,
                   build: bool = True) -> PackedData:
    """:func:`pack_documents` of ``paths``' documents, tokenised once: the blocks are cached on disk
    (written atomically, memory-mapped when read) under a key of the data's content, the tokenizer
    and the settings, so a restart, a resume or another run of the same data reads them in a
    fraction of a second. ``build=False`` only reads (the ranks that wait for one to write)."""
    from spellm_ds.data import assets

    key = packing_key(paths, text_field, tokenizer, seq_len, eval_fraction, seed, max_train_blocks, copy_lists)

    def write(directory: Path) -> None:
        data = pack_documents(load_texts(paths, text_field)["text"], tokenizer, seq_len, eval_fraction, seed,
                              max_train_blocks, copy_lists)
        for split in ("train", "held_out"):
            np.save(directory / f"{split}.npy", getattr(data, split).numpy())
        (directory / "key.json").write_text(json.dumps(key, indent=2) + "\n")

    directory = packed_dir(key)
    if not build and not (directory / "key.json").is_file():
        raise SpellmError(f"the packed data {directory} is missing (the rank that writes it failed); see its error")
    assets.cached_dir(directory, "key.json", write)
    return PackedData(*(torch.from_numpy(np.load(directory / f"{split}.npy", mmap_mode="c"))
                        for split in ("train", "held_out")))
