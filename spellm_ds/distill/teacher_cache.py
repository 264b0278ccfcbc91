"""A disk cache of the frozen teacher's output per block, for runs that read their data more than once.

With the default recipe the teacher's forward is most of a step (1.14 of 1.29 s on SmolLM2-135M in
``bench/results/distill_throughput-20261204-soft-candidates.json``), and its output for a block
never changes. So the first pass over the data stores, per block, what the student needs from the
teacher: its signal (top-5 ids and probabilities, entropy, and the top-M with
``--soft_char_candidates``) and the hidden state the student starts from (the shared trunk; 1.2 KB
per position for SmolLM2 in bf16). Later passes, and every evaluation after the first, read it
instead of running the teacher.

Exactness: a training block's entry is written once, by the rank that reads it in the first pass,
with the values that rank computed; it is read only at a later step (every rank knows when each
block is first read: :func:`spellm_ds.data.packing.first_read_steps`), so what a step reads never depends
on timing, and a resumed run reads what the uninterrupted one did. Blocks whose entries are there
before the run starts (a resumed run's, or another run's linked in by :meth:`TeacherCache.adopt`,
``--teacher_cache_from``) are read from the first step on: the same values, as the fingerprint
matches, and none is being written while it is read. The ranks agree before each
micro-batch whether all of them read it (a ZeRO-3 teacher that still gathers its parameters runs
collectives: one rank running it alone would hang the others). Entries are renamed into place,
so a run that dies leaves none half-written. The cache belongs to one output directory:
``fingerprint.json`` records what the values depend on (model, precision, blocks, batch
composition), and a run with another fingerprint starts the cache anew, the old one set aside
(renamed beside it, never deleted). Runs of one fingerprint
that differ only in how the student trains (pilots of a loss weight, say) can share the teacher's
work: entries are never rewritten, so linking them into another run's cache is safe.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from spellm_ds.distill.teacher import TeacherSignal
from spellm_ds.runtime.atomic import set_aside

FINGERPRINT = "fingerprint.json"
SPLITS = ("train", "held_out")
FIELDS = ("top_ids", "top_probs", "entropy", "wide_ids", "wide_probs")


def entry_files(directory: Path, split: str) -> list[Path]:
    """The entry files of ``split`` in the cache folder ``directory`` (one per block)."""
    return list((directory / split).glob("*.safetensors"))


class TeacherCache:
    def __init__(self, directory: Path, fingerprint: dict[str, Any]) -> None:
        self.directory = directory
        self.fingerprint = fingerprint

    def prepare(self) -> bool:
        """Keep a cache written with the same fingerprint, or start it anew, setting one of another
        fingerprint aside (renamed, never deleted: it holds hours of teacher compute); returns
        whether it was kept. One rank calls it, before any rank reads or writes."""
        stamp = self.directory / FINGERPRINT
        if stamp.is_file() and json.loads(stamp.read_text()) == self.fingerprint:
            return True
        if self.directory.exists():
            print(f"teacher cache of another fingerprint kept as {set_aside(self.directory, 'other')}", flush=True)
        for split in SPLITS:
            (self.directory / split).mkdir(parents=True)
        stamp.write_text(json.dumps(self.fingerprint, indent=2) + "\n")
        return False

    def refusal(self, source: Path) -> str | None:
        """Why the cache directory ``source`` cannot be linked into this one (it holds no cache, or
        one of another fingerprint), or None when it can."""
        stamp = source / FINGERPRINT
        if not stamp.is_file():
            return f"{source} holds no teacher cache"
        theirs = json.loads(stamp.read_text())
        differs = sorted(key for key in self.fingerprint.keys() | theirs.keys()
                         if theirs.get(key) != self.fingerprint.get(key))
        return f"its teacher cache was written for another {', '.join(differs)}" if differs else None

    def adopt(self, source: Path) -> int:
        """Link the entries of ``source``, a cache of the same fingerprint (see :meth:`refusal`),
        that this one lacks (hard links; copies across file systems); returns how many. One rank
        calls it, after :meth:`prepare`, before any rank reads or writes."""
        added = 0
        for split in SPLITS:
            for entry in entry_files(source, split):
                target = self.directory / split / entry.name
                if target.exists():
                    continue
                try:
                    os.link(entry, target)
                except OSError:
                    shutil.copyfile(entry, target)
                added += 1
        return added

    def stored(self, split: str) -> list[int]:
        """The blocks of ``split`` with an entry."""
        return [int(path.name.removesuffix(".safetensors")) for path in entry_files(self.directory, split)]

    def _path(self, split: str, block: int) -> Path:
        return self.directory / split / f"{block}.safetensors"

    def has(self, split: str, blocks: list[int]) -> bool:
        return all(self._path(split, block).is_file() for block in blocks)

    def read(self, split: str, blocks: list[int], device: torch.device) -> tuple[TeacherSignal, torch.Tensor | None]:
        """The stored (signal, trunk) of ``blocks`` as one micro-batch (see :meth:`has`)."""
        entries = [load_file(self._path(split, block)) for block in blocks]
        stacked = {name: torch.stack([entry[name] for entry in entries]).to(device) for name in entries[0]}
        ids = {name: stacked[name].long() for name in ("top_ids", "wide_ids") if name in stacked}
        signal = TeacherSignal(ids["top_ids"], stacked["top_probs"], stacked["entropy"],
                               wide_ids=ids.get("wide_ids"), wide_probs=stacked.get("wide_probs"))
        return signal, stacked.get("trunk")

    def write(self, split: str, blocks: list[int], signal: TeacherSignal, trunk: torch.Tensor | None,
              store: list[bool]) -> None:
        """Store row ``i`` of a micro-batch's output as block ``blocks[i]``'s where ``store[i]``
        (an entry already there is kept)."""
        for row, (block, wanted) in enumerate(zip(blocks, store)):
            path = self._path(split, block)
            if not wanted or path.is_file():
                continue
            tensors = {name: getattr(signal, name)[row] for name in FIELDS if getattr(signal, name) is not None}
            tensors.update({name: tensors[name].int() for name in ("top_ids", "wide_ids") if name in tensors})
            if trunk is not None:
                tensors["trunk"] = trunk[row]
            partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file({name: t.detach().contiguous().cpu().clone() for name, t in tensors.items()}, partial)
            os.replace(partial, path)
