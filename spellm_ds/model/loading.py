"""Reading a Hugging Face model directory with every defect in its files reported as one
:class:`SpellmError` naming the file, before the model is used.

transformers answers a corrupt config, missing or truncated weights and tensors of the wrong shape
with a traceback, and weights missing from the file with a warning and random values: a model
that runs and is silently wrong. Here each is refused, and so are non-finite weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from pathlib import Path

import torch

from spellm_ds.errors import SpellmError, first_line

FIX = "re-export or re-download the model"


def load_config(directory: str | Path):
    """The directory's ``config.json`` as transformers reads it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SpellmError(f"{Path(directory) / 'config.json'} does not load ({first_line(error)}); {FIX}") from None


def check_weight_files(directory: str | Path) -> None:
    """The directory holds weights, and every safetensors file's header reads and covers the file
    (a truncated or foreign file fails here, before any model is built)."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files and not any((directory / name).is_file() for name in ("pytorch_model.bin",
                                                                       "pytorch_model.bin.index.json")):
        raise SpellmError(f"model directory {directory} has no weights (model.safetensors); {FIX}")
    for file in files:
        try:
            with safe_open(file, "pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise SpellmError(f"{file} is not a readable safetensors file ({first_line(error)}); {FIX}") from None


def non_finite(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity."""
    return [name for name, tensor in named_tensors
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def from_pretrained(model_class, directory: str | Path, **kwargs):
    """``model_class.from_pretrained(directory, **kwargs)``, refusing a model whose files lack
    tensors it needs, hold them in another shape, or hold non-finite values (parameters that
    ZeRO-3 has partitioned away are checked where they are gathered, not here)."""
    from safetensors import SafetensorError

    check_weight_files(directory)
    try:
        model, info = model_class.from_pretrained(directory, output_loading_info=True, ignore_mismatched_sizes=True,
                                                  **kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as error:
        raise SpellmError(f"{directory} does not load ({first_line(error)}); {FIX}") from None
    wrong = ([f"{name} missing" for name in sorted(info["missing_keys"])]
             + [f"{name} {tuple(held)} instead of {tuple(needed)}" for name, held, needed in info["mismatched_keys"]])
    if wrong:
        raise SpellmError(f"the weights in {directory} do not fit the model ({len(wrong)} wrong tensors: "
                          f"{', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''}); {FIX}")
    broken = non_finite(chain(model.named_parameters(), model.named_buffers()))
    if broken:
        raise SpellmError(f"the weights in {directory} hold non-finite values ({', '.join(broken[:3])}); "
                          "the model cannot be used: export it again from a finite checkpoint")
    return model
