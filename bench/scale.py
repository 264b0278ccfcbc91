"""Scale evidence: a 1.1B-parameter model distils under ZeRO-3 on this machine's ranks.

    python -m bench.scale [--ranks 2] [--steps 3] [--configs zero3 zero3_offload] [--recipe paper]
                          [--quick] [--out FILE]

Builds a model of TinyLlama-1.1B's shape (22 layers, hidden 2048, FFN 5632, 32 query and 4 KV
heads) with random weights from a local config, with the embedded SmolLM2 tokenizer and its
49,152-token vocabulary (so 1.17B parameters, not TinyLlama's 1.10B with 32,000 tokens), and runs
the real job (``torchrun launch/distill.py``, every rank one thread) a few steps under each
DeepSpeed config, through the final checkpoint and the export. Per config it reports each rank's
peak RSS (and peak accelerator memory on a GPU), the teacher's and the student's parameter bytes
that rank holds after training against the whole model's (ZeRO-3 partitions: about 1/ranks of
it), the median step time and the job's wall time. From these a user sizes a larger run: the
teacher costs ``2 x parameters / ranks`` bytes per rank in bf16, plus the student's trained part
with its fp32 master weights and AdamW states (16 bytes per trained parameter, also partitioned).

``--recipe paper`` (the default here) trains the FFN blocks of the last 5 layers, so the student
holds 5 of the 22 layers and ZeRO-3 partitions gradients and optimizer states as well; ``default``
trains only the read-out and heads. ``--quick``: a tiny Llama-style model with every parameter
partitioned (persistence threshold 0), 2 steps, for the test suite. The same command runs on GPUs
unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import ROOT, distill_job, write
from spellm_ds import cli
from spellm_ds.data import corpus
from spellm_ds.distill.config import parameter_sizes
from spellm_ds.errors import SpellmError

TINYLLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
                "num_key_value_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "tie_word_embeddings": False}
RANK_LINE = re.compile(r"rank (\d+) peak RSS: ([\d.]+) GB(?:, accelerator ([\d.]+) GB)?; parameters held: "
                       r"teacher ([\d.]+) of ([\d.]+) MB, student ([\d.]+) of ([\d.]+) MB")


def random_model(directory: Path) -> None:
    """A TinyLlama-1.1B-shaped Llama with random weights and the embedded tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from spellm_ds.data import assets

    tokenizer = assets.load_tokenizer(assets.resolve_model(assets.EMBEDDED_MODEL))
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **TINYLLAMA_1B)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, max_shard_size="2GB")
    tokenizer.save_pretrained(directory)


def run_job(workdir: Path, name: str, model: str, data: Path, flags: list[str], ranks: int) -> dict:
    """One real job; each rank's memory line and the median step time from TensorBoard."""
    out = workdir / name
    started = time.perf_counter()
    stdout, events = distill_job(name, out, ranks, ["--model", model, "--data", str(data), "--eval_blocks", "1",
                                                    *flags])
    wall = time.perf_counter() - started
    ranks_seen = {}
    for match in RANK_LINE.finditer(stdout):
        rank, rss, accelerator, teacher, teacher_whole, student, student_whole = match.groups()
        ranks_seen[int(rank)] = {"peak_rss_gb": float(rss),
                                 "peak_accelerator_gb": float(accelerator) if accelerator else None,
                                 "teacher_held_mb": float(teacher), "teacher_whole_mb": float(teacher_whole),
                                 "teacher_held_share": float(teacher) / float(teacher_whole),
                                 "student_held_mb": float(student), "student_whole_mb": float(student_whole),
                                 "student_held_share": float(student) / float(student_whole)}
    if len(ranks_seen) != ranks:
        raise SpellmError(f"the {name} job printed {len(ranks_seen)} of {ranks} ranks' memory lines")
    step_s = [e.value for e in events.Scalars("perf/step_s")]
    trained = [line for line in stdout.splitlines() if line.startswith("trainable parameters")]
    return {"ranks": [ranks_seen[r] for r in sorted(ranks_seen)], "step_s_median": statistics.median(step_s),
            "step_s": step_s, "job_wall_s": wall, "trainable": trained[0] if trained else None,
            "exported": (out / "model" / "config.json").is_file()}


def run_config(workdir: Path, name: str, model: str, data: Path, flags: list[str], args) -> dict:
    """The job under ``ds_configs/NAME.json`` (the offload config with ``--teacher_offload`` too)."""
    flags = [*flags, "--teacher_offload"] if name == "zero3_offload" else flags
    for flag, file in (("--deepspeed", f"{name}.json"), ("--teacher_deepspeed", "teacher.json")):
        config = json.loads((ROOT / "ds_configs" / file).read_text())
        if args.quick:  # a tiny model would otherwise persist whole: partition every parameter
            config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (workdir / f"{name}-{file}").write_text(json.dumps(config))
        flags = [*flags, flag, str(workdir / f"{name}-{file}")]
    result = run_job(workdir, name, model, data, flags, args.ranks)
    print(f"{name}: " + "; ".join(f"rank {r}: peak RSS {m['peak_rss_gb']:.2f} GB, teacher held "
                                  f"{m['teacher_held_share']:.1%}" for r, m in enumerate(result["ranks"])), flush=True)
    return result


def main() -> None:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--ranks", type=cli.positive_int, default=2, help="processes (default: %(default)s)")
    parser.add_argument("--steps", type=cli.positive_int, default=3, help="steps per job (default: %(default)s)")
    parser.add_argument("--seq_len", type=cli.positive_int, default=128, help="tokens per block (default: %(default)s)")
    parser.add_argument("--configs", nargs="+", choices=("zero3", "zero3_offload"), default=["zero3", "zero3_offload"],
                        help="ds_configs/NAME.json to run (default: both)")
    parser.add_argument("--recipe", choices=("paper", "default"), default="paper",
                        help="paper: 5 trained FFN blocks and linear heads; default: read-out and heads only "
                             "(default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, every parameter partitioned, 2 steps")
    parser.add_argument("--out", type=cli.output_file, default=None,
                        help="JSON path (default: a new file under bench/results/)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    if args.quick:
        sys.path.insert(0, str(ROOT))
        from tests import tiny

        args.steps, args.seq_len = 2, 32
        model_dir, data = tiny.tiny_setup(workdir, n_texts=40)
    else:
        model_dir = workdir / "tinyllama-1.1b-random"
        random_model(model_dir)
        data = workdir / "corpus.txt"
        texts = corpus.boolq_training_articles()[:200]  # real English; a few steps read a few blocks
        data.write_text("\n\n".join(t.replace("\n\n", "\n") for t in texts))
    flags = ["--max_steps", str(args.steps), "--eval_every", str(args.steps), "--seq_len", str(args.seq_len),
             "--micro_batch", "1"]
    flags += ["--config", str(ROOT / "configs" / "paper.yaml")] if args.recipe == "paper" else []
    flags += ["--trainable_layers", "2", "--k", "6"] if args.quick else []
    parameters = parameter_sizes(model_dir)[0]
    try:
        results = {name: run_config(workdir, name, str(model_dir), data, flags, args) for name in args.configs}
    finally:  # the model and its exports: about 14 GB at full size
        shutil.rmtree(workdir, ignore_errors=True)
    write("scale" + ("_quick" if args.quick else ""),
          {"model": "tiny llama (tests/tiny.py)" if args.quick else "TinyLlama-1.1B shape, random weights",
           "shape": None if args.quick else TINYLLAMA_1B, "parameters": parameters, "ranks": args.ranks,
           "threads_per_rank": 1, "steps": args.steps, "recipe": args.recipe, "flags": flags,
           "configs": {name: f"ds_configs/{name}.json" + (" + --teacher_offload" if name == "zero3_offload" else "")
                       for name in args.configs},
           "persistence_threshold_forced_0": args.quick}, results, args.out)


if __name__ == "__main__":
    cli.run(main)
