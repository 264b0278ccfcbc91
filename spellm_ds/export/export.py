"""Export: a complete distillation checkpoint -> a transformers model of type ``spellm``.

One process, no engine. The base model's frozen weights are copied bit-identically from its
files, the trained ones come from the fp32 master copies; the char heads' spelling temperature is
fitted on the run's held-out blocks (:mod:`spellm_ds.export.calibration`) before anything is written.
The directory (``config.json`` with ``auto_map``, sharded safetensors (all weights, or only those
that differ from the base model's files), the modeling code, the tokenizer,
``generation_config.json``, ``calibration.json`` and a model card) is written beside the target and swapped in (:mod:`spellm_ds.runtime.atomic`): a kill at any point leaves the old model or
the new one, and the next export clears what it left.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from spellm_ds.data.packing import PackedData, cached_packing
from spellm_ds.distill.checkpoint import no_code_from_pickles, read_state, refusal, saved_run
from spellm_ds.distill.config import RunConfig
from spellm_ds.errors import SpellmError
from spellm_ds.export.calibration import CALIBRATION_FILE, fit_spelling_temperature
from spellm_ds.hf.char_heads import fold_whitening
from spellm_ds.model import loading as model_loading
from spellm_ds.model.charset import Charset
from spellm_ds.model.spelling import SpellingTable, model_vocab_size
from spellm_ds.model.spellm import build_export, save_export
from spellm_ds.runtime.atomic import recover_dir, replace_dir, staging_dir

BASE_PREFIX, HEADS_PREFIX = "base.", "char_heads."


def load_base(model_dir: Path):
    """The base model as its files hold it (their dtype), frozen weights bit-identical."""
    from transformers import AutoModelForCausalLM

    if not any(Path(model_dir).glob("*.safetensors")):
        raise SpellmError(f"no .safetensors weights in {model_dir}; re-save the model with safe_serialization")
    return model_loading.from_pretrained(AutoModelForCausalLM, model_dir, dtype="auto")


def run_blocks(run: RunConfig, tokenizer) -> PackedData:
    """The run's training and held-out blocks (read from the packed-data cache the run wrote): the
    training text's token counts rank the shortlist, and the spelling temperature is fitted on the
    first ``eval_blocks`` held-out blocks."""
    for path in run.data or []:
        if not Path(path).exists():
            raise SpellmError(f"the run's data {path} is gone; restore it to export (the spelling temperature "
                              "is fitted on the run's held-out documents, the shortlist counts its training text)")
    return cached_packing(run.data, run.text_field, tokenizer, run.seq_len, run.eval_fraction, run.seed,
                          run.train_blocks, run.copy_lists)


def last_evaluation(output_dir: Path) -> dict[str, float]:
    """The run's last in-training held-out evaluation (``eval/*`` scalars), or {} without a log."""
    from analysis.training_curves import load_events

    try:
        events = load_events(output_dir / "tensorboard")
    except Exception:  # no log, or one TensorBoard cannot read: the card then says nothing
        return {}
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if tag.startswith("eval/")}


def model_card(run: RunConfig, step: int, world_size: int, evaluation: dict[str, float], temperature: float,
               changed_from: Path | None = None) -> str:
    """A short README for the exported directory: what it is, how it was made, how to load it."""
    tokens = step * run.micro_batch * run.grad_accum * world_size * run.seq_len
    agreement = (f"{100 * evaluation['eval/match/exact_or_prefix']:.1f}% of held-out positions (raw argmax "
                 f"characters, exact or prefix match with the teacher's top-1), "
                 f"{100 * evaluation['eval/match/at5']:.1f}% with any of its top-5"
                 if "eval/match/exact_or_prefix" in evaluation else "not logged")
    return f"""# SpeLLM model distilled from `{run.model}`

A [SpeLLM](https://arxiv.org/abs/2507.16323) model made by spellm-ds: the base causal LM with its
output projection replaced by {run.k} character heads, trained by self-distillation from the base
model; the original LM head stays as the fallback for positions the heads are unsure of
(mean head entropy >= tau, `config.tau`).

- base / teacher: `{run.model}`
- recipe: {"read-out " + str(run.readout_width) + " wide" if run.readout_width else "linear heads"}, \
{run.trainable_layers} trainable FFN layers, label rule `{run.label_selection}`
- data: {", ".join(run.data) if run.data else "the spellm-ds default corpus"}; {step} steps, \
{tokens:,} training positions
- held-out agreement at the end of training: {agreement}
- spelling temperature: {temperature}
- weights: {f"only those that differ from the base model's; the rest load from `{changed_from}` (checked by sha256; "
            "`from_pretrained(..., base_model_path=DIR)` where it has moved)" if changed_from else "all of them"}

Load and run it like any causal LM (`trust_remote_code=True` runs the modeling code shipped here;
with `spellm_ds` installed and imported it is not needed):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("DIR")
model = AutoModelForCausalLM.from_pretrained("DIR", trust_remote_code=True)
ids = tok("The capital of France is", return_tensors="pt")
print(tok.decode(model.generate(**ids, max_new_tokens=20)[0]))
```

`generate()` decodes with the char heads (AutoCorrect and fallback as configured; pass `tau=None`
to never fall back); `forward()` returns SpeLLM's own next-token distribution as `logits`.
"""


def export(checkpoint: Path, out_dir: Path, max_shard_size: str = "5GB", changed_only: bool = False) -> Path:
    """Write the SpeLLM model of ``checkpoint`` to ``out_dir`` (see the module docstring);
    ``changed_only``: only the tensors that differ from the base model's, which loading reads from
    the base model's directory (:func:`spellm_ds.model.spellm.save_export`)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from spellm_ds.data.assets import load_tokenizer

    state = read_state(checkpoint)
    model_dir = Path(state["model_dir"])
    if not model_dir.is_dir():
        raise SpellmError(f"the base model {model_dir} of checkpoint {checkpoint} is gone; restore it to export")
    run = RunConfig(**saved_run(state))
    tokenizer = load_tokenizer(model_dir)
    blocks = run_blocks(run, tokenizer)
    try:
        with no_code_from_pickles():
            trained = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name,
                                                               exclude_frozen_parameters=True)
    except Exception as e:  # DeepSpeed raises many types for damaged files
        raise refusal(e, checkpoint) from None
    if broken := model_loading.non_finite(trained.items()):
        raise SpellmError(f"checkpoint {checkpoint} holds non-finite weights ({', '.join(broken[:3])}); "
                          "export an earlier one")
    base = load_base(model_dir)
    charset = Charset(tuple(state["charset"]))
    table = SpellingTable.from_tokenizer(tokenizer, charset, run.k, model_vocab_size(base.config))
    counts = torch.bincount(blocks.train.flatten(), minlength=table.vocab_size)
    model = build_export(run.spellm_config(base.config, charset), base,
                         {n.removeprefix(BASE_PREFIX): t for n, t in trained.items() if n.startswith(BASE_PREFIX)},
                         fold_whitening({n.removeprefix(HEADS_PREFIX): t for n, t in trained.items()
                                         if n.startswith(HEADS_PREFIX)}),
                         table, counts)
    calibration = fit_spelling_temperature(model, blocks.held_out[: run.eval_blocks])
    model.config.spelling_temperature = calibration.temperature
    print(calibration.summary(), flush=True)
    card = model_card(run, int(state["step"]), int(state["world_size"]),
                      last_evaluation(checkpoint.parent.parent), calibration.temperature,
                      model_dir if changed_only else None)
    recover_dir(out_dir)
    staging = staging_dir(out_dir)
    try:
        save_export(model, staging, tokenizer, model_dir, max_shard_size, card, changed_only)
        (staging / CALIBRATION_FILE).write_text(json.dumps(asdict(calibration), indent=2) + "\n")
        replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
