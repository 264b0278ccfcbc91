"""Export a distillation checkpoint as a transformers SpeLLM model (one process, no DeepSpeed launch).

    python launch/export.py --checkpoint OUTPUT_DIR/checkpoints/step300 --out DIR [--max_shard_size 5GB]
                            [--changed_only]

The directory loads with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``
(or without remote code where ``spellm_ds`` is imported): the base model's frozen weights
bit-identical, trained weights from the fp32 master copies, the char heads, every token's
spelling, the config, the tokenizer, a model card, and the char heads' spelling temperature,
fitted on the run's held-out blocks (the run's data must still be where it read it).
``--checkpoint OUTPUT_DIR`` picks that run's latest complete checkpoint. ``--changed_only`` stores
only the tensors that differ from the base model's (heads, read-out, spellings, trained layers):
loading then reads the rest from the base model's directory (or its Hub snapshot), refusing weight
files whose sha256 differs from the ones exported against; ``base_model_path=DIR`` in
``from_pretrained`` points at a moved copy.
"""

from __future__ import annotations

from pathlib import Path

from spellm_ds import cli
from spellm_ds.distill import checkpoint
from spellm_ds.errors import SpellmError
from spellm_ds.export import export


def main() -> None:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a checkpoints/stepN directory or a run's --output_dir")
    parser.add_argument("--out", required=True, help="directory to write the SpeLLM model to")
    parser.add_argument("--max_shard_size", default="5GB",
                        help="largest safetensors file, as save_pretrained takes it (default: %(default)s)")
    parser.add_argument("--changed_only", action="store_true",
                        help="store only the tensors that differ from the base model's; loading needs the base "
                             "model's files (checked by sha256)")
    args = parser.parse_args()
    out = cli.check_output_dir(args.out, "--out", empty=True)
    source = Path(args.checkpoint)
    if checkpoint.step_of(source) < 0 and not (source / checkpoint.COMPLETE).exists():
        found = checkpoint.latest_intact(source)
        if found is None:
            raise SpellmError(f"no intact complete checkpoint in {source}; pass a checkpoints/stepN directory")
        source = found
    print(f"exported {source} -> {export.export(source, out, args.max_shard_size, args.changed_only)}")


if __name__ == "__main__":
    cli.run(main)
