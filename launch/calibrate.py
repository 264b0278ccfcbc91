"""Fit the spelling temperature of an exported SpeLLM model on held-out text.

    python launch/calibrate.py --model DIR [--data FILE ...] [--max_tokens 8192]

Export already fits it, on the run's own held-out blocks. This is for a model exported before
export did (it scores at T = 1), or to fit on text of the domain the model will score. The
default text is what a default run holds out: the held-out documents of the default corpus.
Writes ``spelling_temperature`` into the model's ``config.json`` and the fit into
``calibration.json`` (each replaced atomically); never fit on text you will evaluate on.
"""

from __future__ import annotations

from pathlib import Path

from spellm_ds import cli
from spellm_ds.data.assets import load_tokenizer
from spellm_ds.data.packing import load_texts, pack
from spellm_ds.distill.config import RunConfig
from spellm_ds.errors import SpellmError
from spellm_ds.export.calibration import calibrate
from spellm_ds.export.export import run_blocks
from spellm_ds.model.spellm import read_spellm_config


def main() -> None:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--model", required=True, help="an exported SpeLLM directory (updated in place)")
    parser.add_argument("--data", nargs="*", default=None, metavar="FILE",
                        help="held-out text (.txt/.jsonl/.parquet or dataset dir; default: the default corpus's "
                             "held-out documents)")
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--max_tokens", type=cli.positive_int, default=8192,
                        help="positions to fit on, rounded up to whole 256-token blocks (default: %(default)s)")
    cli.add_device_args(parser)
    args = parser.parse_args()
    model_dir = Path(args.model)
    read_spellm_config(model_dir)  # a clear error for a directory that is no SpeLLM model, before any text loads
    tokenizer = load_tokenizer(model_dir)
    run = RunConfig(eval_blocks=-(-args.max_tokens // RunConfig.seq_len))
    if args.data:
        blocks = pack(load_texts(args.data, args.text_field)["text"], tokenizer, run.seq_len, max_blocks=run.eval_blocks)
    else:
        blocks = run_blocks(run, tokenizer).held_out[: run.eval_blocks]
    if len(blocks) == 0:
        raise SpellmError(f"the held-out text is shorter than one {run.seq_len}-token block; add text with --data")
    print(calibrate(model_dir, blocks, args.dtype, args.device).summary())


if __name__ == "__main__":
    cli.run(main)
