"""What a run was made from, recorded so it can be checked and repeated: content hashes of its
data and model (a resume compares content, not paths), the commit and the package versions."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def content_hash(files: Sequence[Path]) -> str:
    """sha256 over the files' bytes (and their order): what they hold, wherever they lie."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def model_files(model_dir: Path) -> list[Path]:
    """The files that define a model's weights and shape: its config and safetensors."""
    return [Path(model_dir) / "config.json", *sorted(Path(model_dir).glob("*.safetensors"))]


def commit() -> str:
    """The commit of this checkout (``-dirty`` when it has uncommitted changes), or ``unknown``."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str]:
    """The versions of the packages a run's numbers depend on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("spellm-ds", "torch", "deepspeed", "transformers", "tokenizers", "datasets", "safetensors"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found
