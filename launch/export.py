"""Export a distillation checkpoint as an HF-format SpeLLM model directory (one process, no DeepSpeed launch).

    python launch/export.py --checkpoint OUTPUT_DIR/checkpoints/step300 --out DIR

The directory loads with ``SpeLLMForCausalLM.from_pretrained(DIR)``: the base model's frozen
weights bit-identical, trained weights from the fp32 master copies, plus heads, charset, config,
and the char heads' spelling temperature, fitted on the run's held-out blocks (the run's data
must still be where it read it).
``--checkpoint OUTPUT_DIR`` picks that run's latest complete checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from spellm_ds import checkpoint, cli
from spellm_ds.errors import SpellmError


def main() -> None:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a checkpoints/stepN directory or a run's --output_dir")
    parser.add_argument("--out", required=True, help="directory to write the SpeLLM model to")
    args = parser.parse_args()
    out = cli.check_output_dir(args.out, "--out", empty=True)
    source = Path(args.checkpoint)
    if checkpoint.step_of(source) < 0 and not (source / checkpoint.COMPLETE).exists():
        found = checkpoint.complete_checkpoints(source)
        if not found:
            raise SpellmError(f"no complete checkpoint in {source}; pass a checkpoints/stepN directory")
        source = found[-1]
    print(f"exported {source} -> {checkpoint.export(source, out)}")


if __name__ == "__main__":
    cli.run(main)
