"""Checkpoints: atomic save and exact resume (export: :mod:`spellm_ds.export.export`).

Layout: ``output_dir/checkpoints/step{N}/`` holds DeepSpeed's files (ZeRO partitions, optimizer
and LR-schedule state), ``spellm_state.json`` (step, world size, run config, charset, base model
directory), one ``rng_rank{r}.safetensors`` per rank, and last of all ``COMPLETE``. ``COMPLETE`` is
written by rank 0 after every rank has finished writing (a barrier) and every file is flushed to
disk, by an atomic rename, so a directory without it is a half-written checkpoint that resume
never picks. It lists every file's size: a checkpoint damaged later (a file truncated, lost or
replaced by a copy that stopped short) is found before loading, and ``--resume auto`` and export
take the newest intact one instead.

Nothing this package writes is a pickle; DeepSpeed's own files are loaded with ``torch.load``
forced to ``weights_only=True`` (:func:`no_code_from_pickles`), so a planted pickle is refused,
never run.

Frozen parameters are not stored (they are 95% of the model and never change): resume reloads
them from the base model, and export copies them bit-identically from the base model's files.

The data position needs no state of its own: a batch is a pure function of the step
(:func:`spellm_ds.data.packing.step_rows`), so restoring the step restores the sample order; the teacher
cache (:mod:`spellm_ds.distill.teacher_cache`) lives beside the checkpoints and is only ever added to.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from spellm_ds.distill.config import RunConfig
from spellm_ds.errors import SpellmError
from spellm_ds.model.charset import Charset
from spellm_ds.runtime.atomic import replace_file, set_aside, sync_to_disk

COMPLETE = "COMPLETE"
STATE_FILE = "spellm_state.json"
RUN_DEFINING_FLAGS = ("model", "data", "text_field", "train_blocks", "k", "trainable_layers", "train_attention",
                      "head_init", "readout_width", "seq_len", "micro_batch", "grad_accum", "lr", "ffn_lr", "warmup",
                      "max_steps", "reg_weight", "reg_target", "soft_char_weight", "soft_char_candidates",
                      "soft_char_prefix", "spelling_kl_weight", "spelling_kl_fraction", "state_noise", "anchored_rows",
                      "rare_label_power", "label_selection", "label_prior_weight", "label_per_char",
                      "label_gate", "ignore_after_end", "wide_heads", "prototypes", "whiten_readout",
                      "copy_lists", "head_lr", "eval_fraction", "seed")
"""Flags a resumed run must share with its checkpoint: they fix the model, the held-out split, the
data order and the schedule. The rest (evaluation, saving, speed settings) may change."""
BEFORE_THE_FLAG = {"train_attention": False, "ffn_lr": None, "reg_target": "label", "soft_char_weight": 0.0,
                   "soft_char_candidates": 5, "soft_char_prefix": False, "spelling_kl_weight": 0.0,
                   "spelling_kl_fraction": 1.0, "state_noise": 0.0, "anchored_rows": 0, "rare_label_power": 0.0,
                   "label_prior_weight": 1.0, "ignore_after_end": False, "readout_width": 0, "label_per_char": False,
                   "label_gate": None, "wide_heads": False,
                   "prototypes": 0, "whiten_readout": False, "copy_lists": 0.0, "head_lr": None}
"""What a checkpoint written before a flag existed did, which is not always today's default."""
_TAG = re.compile(r"^step(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_of(checkpoint: Path) -> int:
    match = _TAG.match(checkpoint.name)
    return int(match.group(1)) if match else -1


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first; half-written ones are left out."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) >= 0 and (p / COMPLETE).is_file()]
    return sorted(found, key=step_of)


def damage(checkpoint: Path) -> str | None:
    """How a complete checkpoint's files differ from what ``COMPLETE`` recorded (a file missing or
    of another size), or None. A ``COMPLETE`` from before the file list (``step N``) is taken as is."""
    text = (checkpoint / COMPLETE).read_text()
    if text.startswith("step "):
        return None
    try:
        recorded = json.loads(text)["bytes"]
    except (ValueError, KeyError, TypeError):
        return f"its {COMPLETE} marker is unreadable"
    for name, size in recorded.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} holds {path.stat().st_size} bytes, {size} were written"
    return None


def latest_intact(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint whose files are as written; each damaged newer one is named
    (once, by rank 0, where every rank looks)."""
    for found in reversed(complete_checkpoints(output_dir)):
        if (problem := damage(found)) is None:
            return found
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"checkpoint {found} is damaged ({problem}); taking the one before it", flush=True)
    return None


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The run state of a checkpoint; clear errors for missing, half-written, damaged or corrupt ones."""
    if not checkpoint.is_dir():
        raise SpellmError(f"checkpoint {checkpoint} does not exist; pass a checkpoints/stepN directory to --resume")
    if not (checkpoint / COMPLETE).is_file():
        raise SpellmError(f"checkpoint {checkpoint} is incomplete (no {COMPLETE} marker: the run died while "
                          "saving); resume from an earlier one")
    if (problem := damage(checkpoint)) is not None:
        raise SpellmError(f"checkpoint {checkpoint} is damaged ({problem}); resume from an earlier one")
    try:
        return json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError):
        raise SpellmError(f"checkpoint {checkpoint} is corrupt ({STATE_FILE} unreadable); "
                          "resume from an earlier one") from None


def find_resume_point(resume: str, output_dir: str | Path) -> Path | None:
    """``auto``: the latest complete checkpoint in ``output_dir`` (or none); ``none``; or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_intact(output_dir)
    return Path(resume)


def saved_run(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's resolved flags; a flag newer than the checkpoint gets what the run did without it."""
    return {**RunConfig().to_dict(), **BEFORE_THE_FLAG, **state["run"]}


def check_compatible(state: dict[str, Any], run: dict[str, Any], charset: Charset, world_size: int,
                     checkpoint: Path, content: dict[str, str] | None = None) -> None:
    """Refuse a resume that would silently change the run (``run`` holds the resolved flags,
    ``content`` the data's and model's content hashes, :mod:`spellm_ds.runtime.provenance`).

    The model and data are compared by content where the checkpoint recorded it: the same files
    through another path resume, edited files do not. The one flag change allowed, with
    ``--extend_schedule``, is a larger ``--max_steps``: the LR schedule's linear decay is then laid
    over the new total from the resumed step on (the LR rises to where the longer schedule would be
    at that step).
    """
    saved = saved_run(state)
    recorded = state.get("content", {})
    old_packing, new_packing = recorded.get("packing_version", 1), (content or {}).get("packing_version")
    if new_packing is not None and old_packing != new_packing:
        raise SpellmError(f"checkpoint {checkpoint} trained on blocks of packing version {old_packing} and this "
                          f"spellm-ds packs version {new_packing}, other blocks: finish the run with the release that "
                          "started it (its commit is in the checkpoint's spellm_state.json), or start anew in another "
                          "--output_dir")
    for what in ("data", "model"):
        old, new = recorded.get(f"{what}_sha256"), (content or {}).get(f"{what}_sha256")
        if old is not None and new is not None and old != new:
            raise SpellmError(f"checkpoint {checkpoint} was made from other {what} content (sha256 {old[:12]}, "
                              f"this run's is {new[:12]}): resume with the {what} it was trained on, or start anew in "
                              "another --output_dir")
    for key in RUN_DEFINING_FLAGS:
        old, new = saved[key], run[key]
        by_content = key in ("model", "data") and f"{key}_sha256" in recorded and content is not None
        if old == new or by_content or (key == "max_steps" and run["extend_schedule"] and new > old):
            continue
        if key == "ffn_lr" and old is None and saved["trainable_layers"] > 0:
            raise SpellmError(f"checkpoint {checkpoint} trained its pretrained blocks at --lr in one parameter "
                              "group (made before --ffn_lr had a default), which this version cannot resume: "
                              "export it with launch/export.py, or start anew in another --output_dir")
        hint = "; to train on, pass a larger --max_steps with --extend_schedule" if key == "max_steps" else ""
        raise SpellmError(f"checkpoint {checkpoint} was made with --{key} {old!r}, this run has {new!r}: resume "
                          f"with the same --{key}{hint}, or start anew in another --output_dir (or here with "
                          "--resume none --overwrite)")
    if state["charset"] != list(charset.symbols):
        raise SpellmError(f"checkpoint {checkpoint} uses another charset; pass the same --charset, or start anew in another --output_dir")
    if state["world_size"] != world_size:
        raise SpellmError(f"checkpoint {checkpoint} was written by {state['world_size']} ranks, this run has "
                          f"{world_size}; resume with {state['world_size']} ranks (ZeRO partitions are per rank) "
                          "or export it and start a new run")
    missing = [path for path in (rng_file(checkpoint, r) for r in range(world_size)) if not path.is_file()]
    if missing:
        raise SpellmError(f"checkpoint {checkpoint} lacks {missing[0].name} (damaged); resume from an earlier one "
                          "with --resume PATH")


def rng_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"rng_rank{rank}.safetensors"


def _save_rng(path: Path) -> None:
    """This rank's torch, numpy and Python RNG states as safetensors (numbers only: nothing to unpickle)."""
    import numpy as np

    name, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    save_file({"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
               "python": torch.tensor(internal, dtype=torch.int64)}, path,
              metadata={"numpy": json.dumps([name, int(position), int(has_gauss), float(gauss)]),
                        "python": json.dumps([version, python_gauss])})


def _restore_rng(path: Path) -> None:
    import numpy as np

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in ("torch", "numpy_keys", "python")}
            meta = f.metadata()
        name, position, has_gauss, gauss = json.loads(meta["numpy"])
        version, python_gauss = json.loads(meta["python"])
        torch.set_rng_state(tensors["torch"])
        np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, gauss))
        random.setstate((version, tuple(tensors["python"].tolist()), python_gauss))
    except Exception as e:  # a damaged file fails in safetensors, JSON or the RNGs' own checks
        raise SpellmError(f"{path} is not a valid RNG state ({type(e).__name__}); resume from an earlier "
                          "checkpoint with --resume PATH") from None


TRUSTED_PICKLE_CLASSES = ("deepspeed.runtime.zero.config.ZeroStageEnum",
                          "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                          "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler")
"""The only classes DeepSpeed's checkpoint files may name besides tensors and containers."""


@contextmanager
def no_code_from_pickles():
    """Every ``torch.load`` inside (DeepSpeed's own, which asks for ``weights_only=False``) is forced
    to ``weights_only=True`` with only :data:`TRUSTED_PICKLE_CLASSES` allowed: a checkpoint file
    that names anything else (a planted ``os.system``, say) is refused instead of run."""
    import importlib

    classes = []
    for dotted in TRUSTED_PICKLE_CLASSES:
        module, _, name = dotted.rpartition(".")
        classes.append(getattr(importlib.import_module(module), name))
    saved = {var: os.environ.pop(var, None) for var in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                                        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(classes):
            yield
    finally:
        for var, value in saved.items():
            os.environ.pop(var, None)
            if value is not None:
                os.environ[var] = value


def refusal(error: Exception, checkpoint: Path) -> SpellmError:
    """The one-line error for a checkpoint DeepSpeed could not load (refused pickles named as such)."""
    if isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in str(error):
        return SpellmError(f"checkpoint {checkpoint} holds a file that names code to run when loaded, beyond "
                           "tensors and DeepSpeed's own state; refused (it was not run): resume or export from "
                           "a checkpoint you trust")
    detail = str(error).splitlines()[0] if str(error) else ""
    return SpellmError(f"checkpoint {checkpoint} could not be loaded ({type(error).__name__}: {detail}); "
                       "resume from an earlier one")


def save(engine, output_dir: str | Path, step: int, run: dict[str, Any], charset: Charset, model_dir: Path,
         keep: int, content: dict[str, str] | None = None) -> Path:
    """Collective: every rank writes its part; rank 0 commits with COMPLETE and prunes old ones."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    checkpoint = checkpoints_dir(output_dir) / f"step{step}"
    if rank == 0 and (checkpoint / COMPLETE).is_file():  # a resume from an earlier step got here again
        print(f"kept the earlier {checkpoint} as {set_aside(checkpoint, 'superseded')}", flush=True)
    elif rank == 0 and checkpoint.exists():  # a half-written leftover of a run that died at this step
        shutil.rmtree(checkpoint)
    dist.barrier()
    engine.save_checkpoint(str(checkpoint.parent), tag=checkpoint.name, save_latest=False,
                           exclude_frozen_parameters=True)
    _save_rng(rng_file(checkpoint, rank))
    if rank == 0:
        state = {"step": step, "world_size": world_size, "run": run, "charset": list(charset.symbols),
                 "model_dir": str(model_dir), "content": content or {}}
        (checkpoint / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        sync_to_disk(checkpoint)
        files = {str(path.relative_to(checkpoint)): path.stat().st_size
                 for path in sorted(checkpoint.rglob("*")) if path.is_file()}
        replace_file(checkpoint / COMPLETE, json.dumps({"step": step, "bytes": files}, indent=1) + "\n")
        _prune(output_dir, keep, newest=checkpoint)
    dist.barrier()
    return checkpoint


def _prune(output_dir: str | Path, keep: int, newest: Path) -> None:
    """Keep the last ``keep`` complete checkpoints; drop half-written ones older than ``newest``."""
    complete = complete_checkpoints(output_dir)
    doomed = complete[: max(0, len(complete) - keep)]
    doomed += [p for p in checkpoints_dir(output_dir).iterdir()
               if 0 <= step_of(p) < step_of(newest) and not (p / COMPLETE).is_file()]
    for path in doomed:  # the marker first: a kill inside rmtree leaves a half-written step, not a damaged complete one
        (path / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)


def load(engine, checkpoint: Path) -> int:
    """Restore engine, optimizer, LR schedule and this rank's RNG; returns the step to continue from."""
    state = read_state(checkpoint)
    try:
        with no_code_from_pickles():
            path, _ = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name, load_module_strict=False)
    except Exception as e:  # DeepSpeed raises many types for damaged files
        raise refusal(e, checkpoint) from None
    if path is None:
        raise SpellmError(f"checkpoint {checkpoint} has no DeepSpeed state; resume from an earlier one")
    _restore_rng(rng_file(checkpoint, dist.get_rank()))
    return int(state["step"])
