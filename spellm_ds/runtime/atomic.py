"""Writes that a kill cannot leave half done, and that destroy nothing a user did not ask to lose.

A file is written to a temporary name and renamed over the old one. A directory (an exported
model) is written beside its target and swapped in by two renames: the old one is first renamed
aside, then the new one into place, then the old one removed. A kill between the renames leaves
the old one aside; :func:`recover_dir`, called before the next write, puts it back and clears
what an interrupted write left.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path


def replace_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, flushed to disk, and a rename."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    sync_to_disk(partial)
    os.replace(partial, path)
    sync_to_disk(path.parent)


def sync_to_disk(path: Path) -> None:
    """Flush a file, or every file and folder under a directory, from the page cache to the disk:
    a rename that commits them must not reach the disk before their bytes do (a power cut would
    leave a committed name on empty or short files)."""
    items = [*sorted(path.rglob("*")), path] if path.is_dir() else [path]
    for item in items:
        descriptor = os.open(item, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def staging_dir(target: Path) -> Path:
    """A new empty directory beside ``target`` to write its replacement into."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-staging-"))


def replace_dir(staging: Path, target: Path) -> None:
    """Swap the written ``staging`` in as ``target`` (see the module docstring)."""
    aside = target.with_name(f".{target.name}-old-{os.getpid()}")
    sync_to_disk(staging)
    if target.exists():
        os.rename(target, aside)
    os.rename(staging, target)
    sync_to_disk(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def recover_dir(target: Path) -> None:
    """Undo what a killed :func:`replace_dir` or writer left: the old ``target`` put back if it was
    aside when the kill came, stale staging and set-aside copies removed."""
    leftovers = sorted(target.parent.glob(f".{target.name}-old-*")) if target.parent.is_dir() else []
    if not target.exists() and leftovers:
        os.rename(leftovers.pop(), target)
    for path in leftovers + sorted(target.parent.glob(f".{target.name}-staging-*")):
        shutil.rmtree(path, ignore_errors=True)


def set_aside(path: Path, why: str) -> Path:
    """Rename ``path`` to a sibling named by ``why`` and the time, and return it: kept, out of the way."""
    aside = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(path, aside)
    return aside
