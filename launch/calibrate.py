"""Calibrate the char heads' token distribution of an exported SpeLLM model on held-out text.

    python launch/calibrate.py --model DIR [--training_data FILE ...] [--data FILE ...] [--max_tokens 8192]

Export already does this, on the run's own text. This is for a model exported before export did
(or before it fitted the unigram weight), or to fit on text of the domain the model will score.
It fits the spelling temperature and the unigram weight (``spellm_ds/calibration.py``) the way
export does: the unigram counted on the training documents of the run's data (``--training_data``,
split as distill splits it by default; default: the default corpus), fitted on its held-out
documents, or on ``--data`` instead. Writes both into the model's ``spellm_config.json``, the
counts into ``unigram.safetensors`` and the fit into ``calibration.json``; never fit on text you
will evaluate on.
"""

from __future__ import annotations

from pathlib import Path

from spellm_ds import cli
from spellm_ds.assets import load_tokenizer
from spellm_ds.calibration import calibrate
from spellm_ds.checkpoint import calibration_blocks
from spellm_ds.config import RunConfig
from spellm_ds.data import load_texts, pack
from spellm_ds.errors import SpellmError
from spellm_ds.model import SpeLLMConfig


def main() -> None:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--model", required=True, help="an exported SpeLLM directory (updated in place)")
    parser.add_argument("--training_data", nargs="*", default=None, metavar="FILE",
                        help="the data the model was distilled on, as passed to distill's --data (default: the "
                             "default corpus)")
    parser.add_argument("--data", nargs="*", default=None, metavar="FILE",
                        help="held-out text to fit on (.txt/.jsonl/.parquet or dataset dir; default: the held-out "
                             "documents of --training_data)")
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--max_tokens", type=cli.positive_int, default=8192,
                        help="positions to fit on, rounded up to whole 256-token blocks (default: %(default)s)")
    args = parser.parse_args()
    model_dir = Path(args.model)
    SpeLLMConfig.load(model_dir)  # a clear error for a directory that is no SpeLLM model, before any text loads
    tokenizer = load_tokenizer(model_dir)
    run = RunConfig(data=args.training_data, text_field=args.text_field,
                    eval_blocks=-(-args.max_tokens // RunConfig.seq_len))
    given = load_texts(args.data, args.text_field)["text"] if args.data else None
    blocks, training = calibration_blocks(run, tokenizer)
    if given is not None:
        blocks = pack(given, tokenizer, run.seq_len, max_blocks=run.eval_blocks)
    if len(blocks) == 0:
        raise SpellmError(f"the held-out text is shorter than one {run.seq_len}-token block; add text with --data")
    print(calibrate(model_dir, blocks, training).summary())


if __name__ == "__main__":
    cli.run(main)
