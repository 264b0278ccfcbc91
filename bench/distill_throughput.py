"""Distillation throughput of the real job, against the machine's bound.

    python -m bench.distill_throughput [--steps 8] [--repeats 1] [--variants NAME ...] [--quick] [--out FILE]

- ``bound_1xN`` / ``bound_Nx1``: no DeepSpeed, exactly one step's computation of the default
  job (teacher forward with top-5 and entropy; the student's trainable part from the shared
  trunk: the read-out and heads, in the paper's recipe also the top layers with the same
  activation checkpointing; the fp32 losses, backward, AdamW on the trainable parameters) on the
  same model, dtype, sequence length and global batch, as one process with every core as a
  thread, or as one single-thread process per core each doing its share (no communication).
  The better of the two is the ceiling the job is measured against: on a CPU, two
  single-thread processes do more than one process with two threads.
- job variants: the real job (``torchrun``, ``ds_configs/zero3.json``, the embedded SmolLM2 and
  corpus, default flags) with one setting changed each (see ``VARIANTS``); tokens/s is summed over
  ranks, the median over the steps after the first two, from the run's TensorBoard scalars.

Variants run interleaved, ``--repeats`` rounds; each reports the median and range over rounds and
its ratio to the bound: of the medians, and within each round (median and range over rounds), which
cancels the machine's drift between rounds. The JSON records the commit it was measured at and
goes to a new file under ``bench/results/`` unless ``--out`` names one.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from bench.common import ROOT, distill_job, write
from spellm_ds import cli

TAGS = ("perf/tokens_per_s", "perf/step_s", "perf/teacher_s", "perf/student_s", "perf/backward_s")
CORES = os.cpu_count() or 1
ZERO3 = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())


TEACHER = json.loads((ROOT / "ds_configs" / "teacher.json").read_text())


def _with_zero(config: dict, **settings) -> dict:
    config = json.loads(json.dumps(config))
    config["zero_optimization"].update(settings)
    return config


def _both_engines(**settings) -> dict[str, dict]:
    """The same ZeRO settings in the student's and the teacher's config."""
    return {"student_config": _with_zero(ZERO3, **settings), "teacher_config": _with_zero(TEACHER, **settings)}


class Variant(NamedTuple):
    flags: list[str]
    ranks: int = 2
    threads: int = 1
    student_config: dict | None = None  # None: ds_configs/zero3.json
    teacher_config: dict | None = None  # None: ds_configs/teacher.json


VARIANTS: dict[str, Variant] = {
    "default": Variant([]),
    # the settings before persistence "auto": both engines fully sharded above 10,000 elements
    "persistence_10000": Variant([], **_both_engines(stage3_param_persistence_threshold=10_000)),
    "persistence_0": Variant([], **_both_engines(stage3_param_persistence_threshold=0)),
    # torch's own F.linear, not the "memory-efficient" one ZeRO-3 installs process-wide (no gain measured)
    "torch_linear": Variant([], **_both_engines(memory_efficient_linear=False)),
    # the teacher whole ("auto"), the student sharded at DeepSpeed's default threshold
    "student_sharded": Variant([], student_config=_with_zero(ZERO3, stage3_param_persistence_threshold=100_000)),
    "teacher_stage_0": Variant(["--teacher_stage", "0"]),
    "micro_batch_4": Variant(["--micro_batch", "4"]),
    "micro_batch_8": Variant(["--micro_batch", "8"]),
    "one_rank_two_threads": Variant(["--micro_batch", "4"], ranks=1, threads=CORES),
    "no_shared_trunk": Variant(["--no-shared_trunk"]),
    # the paper's recipe: linear heads and the FFNs of the last 5 layers train
    "paper_recipe": Variant(["--trainable_layers", "5", "--readout_width", "0"]),
    # the spelling KL (off by default): scores every valid spelling at every position
    "spelling_kl": Variant(["--spelling_kl_weight", "0.3"]),
    "spelling_kl_quarter": Variant(["--spelling_kl_weight", "0.3", "--spelling_kl_fraction", "0.25"]),
    "spelling_kl_eighth": Variant(["--spelling_kl_weight", "0.3", "--spelling_kl_fraction", "0.125"]),
    # soft targets from the teacher's top-256 instead of its top-5
    "soft_char_256": Variant(["--soft_char_candidates", "256"]),
    # the teacher cache's first pass: every block is new, so the teacher runs and its output is written
    "teacher_cache_first_pass": Variant(["--teacher_cache"]),
    # later passes: 8 blocks are two steps a pass, so every measured step (after the first two) reads the cache
    "teacher_cache_later_passes": Variant(["--teacher_cache", "--train_blocks", "8"]),
}


def variant_settings(variant: Variant) -> dict:
    zero = (variant.student_config or ZERO3)["zero_optimization"]
    return {"flags": variant.flags, "ranks": variant.ranks, "threads_per_rank": variant.threads,
            "persistence_threshold": zero.get("stage3_param_persistence_threshold"),
            "memory_efficient_linear": zero.get("memory_efficient_linear")}


BOUNDS = {f"bound_1x{CORES}": (1, CORES), f"bound_{CORES}x1": (CORES, 1)}


def run_job(workdir: Path, name: str, extra: list[str], variant: Variant, steps: int) -> dict[str, float]:
    """One real job; medians over its steps after the first two, tokens/s summed over ranks."""
    extra = [*extra, *variant.flags]
    for flag, config in (("--deepspeed", variant.student_config), ("--teacher_deepspeed", variant.teacher_config)):
        if config is not None:
            config_path = workdir / f"{name}{flag.replace('-', '_')}.json"
            config_path.write_text(json.dumps(config))
            extra = [flag, str(config_path), *extra]
    _, events = distill_job(name, workdir / f"{name}-{time.monotonic_ns()}", variant.ranks,
                            ["--max_steps", str(steps), "--eval_every", "100000", "--eval_blocks", "2", *extra],
                            variant.threads)
    medians = {}
    for tag in TAGS:
        values = [e.value for e in events.Scalars(tag) if e.step > 2] or [e.value for e in events.Scalars(tag)]
        medians[tag.removeprefix("perf/")] = statistics.median(values)
    medians["tokens_per_s"] *= variant.ranks  # TensorBoard logs rank 0's; every rank processes as many
    return medians


def bound(model: str, data: list[str] | None, overrides: dict[str, int], steps: int, processes: int,
          threads: int) -> dict[str, float]:
    """The default job's step computation without DeepSpeed, split over ``processes`` concurrent
    processes of ``threads`` threads each; tokens/s summed over them."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        shares = pool.starmap(bound_share, [(model, data, overrides, steps, processes, threads)] * processes)
    step_s = max(s for s, _ in shares)
    return {"tokens_per_s": sum(tokens / s for s, tokens in shares), "step_s": step_s}


def bound_share(model: str, data: list[str] | None, overrides: dict[str, int], steps: int, processes: int,
                threads: int) -> tuple[float, int]:
    """One process's share of the bound: (median step seconds, tokens per step)."""
    from transformers import AutoModelForCausalLM

    from spellm_ds.data import assets
    from spellm_ds.data.packing import load_texts, pack
    from spellm_ds.distill.config import DEFAULTS, RunConfig
    from spellm_ds.distill.forward import synchronized_clock, teacher_and_student
    from spellm_ds.distill.losses import distillation_loss
    from spellm_ds.hf.char_decoding import CharDecoder
    from spellm_ds.model.charset import Charset
    from spellm_ds.model.spelling import SpellingTable, model_vocab_size
    from spellm_ds.model.spellm import Student, init_heads, shared_trunk_layer
    from spellm_ds.runtime import precision

    torch.set_num_threads(threads)
    run = RunConfig(model=model, data=data, **overrides)
    share = DEFAULTS["micro_batch"] * VARIANTS["default"].ranks // processes  # of the default job's global batch
    model_dir = assets.resolve_model(run.model)
    tokenizer = assets.load_tokenizer(model_dir)
    dtype = precision.choose("cpu").dtype  # what the job's "auto" picks
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval().requires_grad_(False)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    charset = Charset.default()
    table = SpellingTable.from_tokenizer(tokenizer, charset, run.k, model_vocab_size(base.config))
    decoder = CharDecoder(table, tau=None)
    run.fit_to_model(base.config.num_hidden_layers, base.config.hidden_size)
    student = Student(base, run.spellm_config(base.config, charset))
    init_heads(student.char_heads, base.get_output_embeddings().weight.detach(), table)
    student.freeze_for_distillation()
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    blocks = pack(load_texts(run.data)["text"], tokenizer, run.seq_len, max_blocks=(steps + 1) * share)
    trunk_layer = shared_trunk_layer(base.config.num_hidden_layers, run.trainable_layers)
    times = []
    for step in range(steps + 1):  # the first step warms up
        ids = blocks[step * share : (step + 1) * share]
        started = synchronized_clock()
        signal, out, labels = teacher_and_student(teacher, student, ids, table, run.label_rule(), trunk_layer,
                                                  with_token_logits=run.needs_token_logits, wide_k=run.wide_k)
        loss = distillation_loss(out.char_logits, out.token_logits, labels, signal, table, run.loss_recipe(),
                                 decoder=decoder)
        loss.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(synchronized_clock() - started)
    return statistics.median(times[1:]), ids.numel()


def summary(samples: list[dict[str, float]]) -> dict:
    tokens = [s["tokens_per_s"] for s in samples]
    out = {"tokens_per_s": statistics.median(tokens), "tokens_per_s_range": [min(tokens), max(tokens)],
           "tokens_per_s_by_round": tokens, "rounds": len(samples)}
    for key in samples[0]:
        if key != "tokens_per_s":
            out[key] = statistics.median(s[key] for s in samples)
    return out


def main() -> None:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--steps", type=cli.positive_int, default=8, help="steps per run (default: %(default)s)")
    parser.add_argument("--repeats", type=cli.positive_int, default=1, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--variants", nargs="+", choices=[*BOUNDS, *VARIANTS], default=[*BOUNDS, *VARIANTS],
                        help="what to measure (default: all)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, 3 steps, for CI")
    parser.add_argument("--out", type=cli.output_file, default=None,
                        help="JSON path (default: a new file under bench/results/)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    overrides: dict[str, int] = {}
    model, data = "smollm2-135m", None
    if args.quick:
        sys.path.insert(0, str(ROOT))
        from tests import tiny

        model_dir, corpus = tiny.tiny_setup(workdir, n_texts=60)
        model, data = str(model_dir), [str(corpus)]
        overrides = {"trainable_layers": 2, "seq_len": 32, "k": 6}
        args.steps = 3
    extra = [item for flag, value in overrides.items() for item in (f"--{flag}", str(value))]
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in args.variants}
    for _ in range(args.repeats):
        for name in args.variants:
            if name in BOUNDS:
                samples[name].append(bound(model, data, overrides, args.steps, *BOUNDS[name]))
            else:
                samples[name].append(run_job(workdir, name, ["--model", model, *(["--data", *data] if data else []),
                                                             *extra], VARIANTS[name], args.steps))
            print(f"{name}: {samples[name][-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    results = {name: summary(runs) for name, runs in samples.items()}
    bounds = [name for name in BOUNDS if name in results]
    if bounds:
        ceiling = max(results[name]["tokens_per_s"] for name in bounds)
        # the VM's speed drifts between rounds; a ratio within one round cancels the drift
        round_ceilings = [max(samples[name][i]["tokens_per_s"] for name in bounds) for i in range(args.repeats)]
        for name, result in results.items():
            result["ratio_to_bound"] = result["tokens_per_s"] / ceiling
            paired = [s["tokens_per_s"] / c for s, c in zip(samples[name], round_ceilings)]
            result["ratio_to_bound_within_round"] = {"median": statistics.median(paired), "range": [min(paired),
                                                                                                 max(paired)]}
    write("distill_throughput" + ("_quick" if args.quick else ""),
          {"launcher": "torchrun", "deepspeed_config": "ds_configs/zero3.json", "steps": args.steps,
           "repeats": args.repeats, "model": model, "extra_flags": extra, "cores": CORES,
           "variants": {name: variant_settings(VARIANTS[name]) for name in args.variants if name in VARIANTS},
           "bounds": {name: {"processes": p, "threads": t} for name, (p, t) in BOUNDS.items() if name in args.variants}},
          results, args.out)


if __name__ == "__main__":
    cli.run(main)
