"""The ``spellm`` command: every entry point of the project as a subcommand.

    spellm distill [flags]           (also: python -m spellm_ds distill; under a launcher:
                                      torchrun --nproc_per_node N -m spellm_ds distill [flags])
    spellm report --model DIR --out DIR
    spellm bench decode-speed --model DIR
    spellm SUBCOMMAND --help

Each subcommand is one module's command line, unchanged (``spellm export`` is ``python
launch/export.py``); ``deepspeed launch/distill.py --deepspeed ds_configs/zero3.json`` keeps working.
"""

from __future__ import annotations

import importlib
import runpy
import sys

COMMANDS = {
    "distill": "launch.distill",
    "export": "launch.export",
    "calibrate": "launch.calibrate",
    "generate": "launch.generate",
    "evaluate": "launch.evaluate",
    "lm-eval": "launch.lm_eval_spellm",
    "spelling-report": "launch.spelling_report",
    "report": "analysis.report",
    "match-rates": "analysis.match_rates",
    "blending": "analysis.blending",
    "entropy": "analysis.entropy",
    "token-length": "analysis.token_length",
    "likelihood": "analysis.likelihood",
    "label-frequency": "analysis.label_frequency",
    "free-running": "analysis.free_running",
    "training-curves": "analysis.training_curves",
    "downstream-compare": "analysis.downstream_compare",
    "pilots": "analysis.pilots",
}
BENCHMARKS = {
    "decode-speed": "bench.decode_speed",
    "operating-points": "bench.operating_points",
    "head-cost": "bench.head_cost",
    "distill-throughput": "bench.distill_throughput",
    "scale": "bench.scale",
}


def summary(module: str) -> str:
    """The first line of a module's docstring (read from its source: nothing is imported)."""
    import ast

    spec = importlib.util.find_spec(module)
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return doc.splitlines()[0] if doc else ""


def usage() -> str:
    lines = [__doc__.strip(), "", "subcommands:"]
    lines += [f"  {name:<20} {summary(module)}" for name, module in COMMANDS.items()]
    lines += ["", "benchmarks (spellm bench NAME):"]
    lines += [f"  {name:<20} {summary(module)}" for name, module in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return
    name, rest = args[0], args[1:]
    table, prog = COMMANDS, f"spellm {name}"
    if name == "bench":
        if not rest or rest[0] in ("-h", "--help"):
            print(usage())
            return
        table, name, rest, prog = BENCHMARKS, rest[0], rest[1:], f"spellm bench {rest[0]}"
    if name not in table:
        print(f"error: unknown subcommand {name!r}; see spellm --help", file=sys.stderr)
        sys.exit(2)
    sys.argv = [prog, *rest]
    runpy.run_module(table[name], run_name="__main__")  # sys.argv[0] stays the subcommand: its usage line


if __name__ == "__main__":
    main()
