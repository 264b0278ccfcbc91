"""Convert a pretrained causal LM into a SpeLLM model by online self-distillation.

    deepspeed --num_gpus 2 launch/distill.py --deepspeed ds_configs/zero3.json [--config configs/X.yaml] [flags]
    torchrun --nproc_per_node 2 launch/distill.py ...      mpirun -np 2 python launch/distill.py ...
    spellm distill ...  (one process; under a launcher: torchrun ... -m spellm_ds distill ...)

With no --model/--data it distils the embedded SmolLM2-135M-Instruct on the built-in five-source corpus.
The default recipe trains the char heads behind a residual MLP read-out on the teacher's own final
hidden state (the fallback path is then exactly the teacher); --trainable_layers 5 --readout_width 0
is the paper's (configs/paper.yaml). A recipe file sets any option; flags given here override it.
Values left "auto" in the DeepSpeed config (batch sizes, lr, schedule, bf16) are filled from the options.
"""

from __future__ import annotations

import argparse

from spellm_ds import cli
from spellm_ds.distill.config import RunConfig


def parse_args(argv: list[str] | None = None) -> RunConfig:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--config", metavar="FILE.yaml", help="a recipe file (configs/*.yaml): its values replace "
                        "the defaults below; flags given here override it")
    cli.add_options(parser, RunConfig)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    recipe, _ = parser.parse_known_args(argv)
    if recipe.config:
        parser.set_defaults(**cli.read_recipe(recipe.config, RunConfig))
    args = vars(parser.parse_args(argv))
    for launcher_only in ("local_rank", "config"):
        args.pop(launcher_only)
    return RunConfig(**args)


def main(argv: list[str] | None = None) -> None:
    from spellm_ds.distill.train import run  # DeepSpeed is imported once the command line is read

    run(parse_args(argv))


if __name__ == "__main__":
    cli.run(main)
