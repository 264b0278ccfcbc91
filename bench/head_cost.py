"""Output-head cost per position: the LM head against SpeLLM's char-head path.

    python -m bench.head_cost [--threads N] [--rerank_k 16] [--quick] [--out FILE]

Variants (all on the same hidden states, SmolLM2-135M dimensions: d=576, |V|=49152, k=10,
|C|=105, the real SmolLM2 spelling table):
  (a) lm_head        LM head GEMM + argmax (the baseline: what picks a token today)
  (b) char_heads     the fused k-head GEMM alone
  (c) + lookup       argmax per head, spelling hash lookup
  (d) + autocorrect  the vocabulary-wide AutoCorrect argmax for every row (the worst case: decoding
                     repairs only the rows whose string missed)
  (e) + entropy      mean head entropy and the fallback mask too = CharDecoder.propose
  (f) decode path    (c) + entropy and fallback mask, no AutoCorrect: a step where every row hit
  (g) + read-out     (f) behind a residual MLP read-out of ``--readout_width`` (default 2d; beyond
                     the paper, see ``--readout_width`` of distill)
  (h) + re-rank      (g) with every row re-ranked: its top ``--rerank_k`` spellings scored by as many
                     LM-head rows (beyond the paper; ``--rerank_k`` of decoding)
Batch sizes 1, 8, 64; fp32 and bf16; time per position and ratio to (a); every variant at the
same stated thread count (``--threads``, default the cores).
"""

from __future__ import annotations

import torch

from bench.common import add_dtypes_arg, add_threads_arg, dtypes_to_time, median_seconds, write
from spellm_ds import cli
from spellm_ds.distill.config import READOUT_PER_HIDDEN
from spellm_ds.hf.char_decoding import CharDecoder
from spellm_ds.hf.char_heads import CharHeads
from spellm_ds.model.charset import Charset


def spelling_table(quick: bool, k: int):
    from spellm_ds.model.spelling import SpellingTable

    if quick:
        from tests import tiny

        tokenizer = tiny.trained_tokenizer(tiny.corpus_texts(40), vocab_size=300)
    else:
        from spellm_ds.data import assets

        tokenizer = assets.load_tokenizer(assets.embedded_model_dir())
    return SpellingTable.from_tokenizer(tokenizer, Charset.default(), k, len(tokenizer))


def main() -> None:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--out", type=cli.output_file, default=None)
    parser.add_argument("--readout_width", type=cli.positive_int, default=None,
                        help=f"width of the read-out timed in (g) (default: {READOUT_PER_HIDDEN} x the hidden size)")
    parser.add_argument("--rerank_k", type=cli.positive_int, default=16,
                        help="spellings re-ranked per row in (h) (default: %(default)s)")
    add_threads_arg(parser)
    add_dtypes_arg(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k = 10
    table = spelling_table(args.quick, k)
    d = 64 if args.quick else 576
    vocab, num_chars = table.vocab_size, len(table.charset)
    readout_width = args.readout_width or READOUT_PER_HIDDEN * d
    decoder = CharDecoder(table, tau=0.22)
    min_time = 0.05 if args.quick else 1.0
    results = []
    for dtype in dtypes_to_time(args.dtypes):
        torch.manual_seed(0)
        lm_head = torch.nn.Linear(d, vocab, bias=False).to(dtype)
        heads = CharHeads(d, k, num_chars).to(dtype)
        with_readout = CharHeads(d, k, num_chars, readout_width).to(dtype)
        for batch in (1, 8, 64):
            hidden = torch.randn(batch, d, dtype=dtype)
            with torch.no_grad():
                variants = {
                    "a_lm_head": lambda: lm_head(hidden).argmax(-1),
                    "b_char_heads": lambda: heads(hidden),
                    "c_lookup": lambda: table.lookup(heads(hidden).argmax(-1)),
                    "d_autocorrect": lambda: (lambda logits: (table.lookup(logits.argmax(-1)),
                                                              decoder.autocorrect(logits)))(heads(hidden)),
                    "e_entropy": lambda: decoder.propose(heads(hidden)),
                    "f_decode_path": lambda: decoder.propose(heads(hidden), autocorrect=False),
                    "g_readout_decode_path": lambda: decoder.propose(with_readout(hidden), autocorrect=False),
                    "h_rerank": lambda: (lambda logits: (decoder.propose(logits, autocorrect=False),
                                                         decoder.rerank(logits, hidden, lm_head, args.rerank_k)))(
                                                             with_readout(hidden)),
                }
                per_position = {name: median_seconds(fn, min_time) / batch for name, fn in variants.items()}
            base = per_position["a_lm_head"]
            results.append({"dtype": str(dtype).removeprefix("torch."), "batch": batch,
                            "seconds_per_position": per_position,
                            "speedup_vs_lm_head": {name: base / t for name, t in per_position.items()}})
            print(f"{dtype} batch {batch}: " + ", ".join(f"{n} {base / t:.1f}x" for n, t in per_position.items()))
    write("head_cost" + ("_quick" if args.quick else ""),
          {"hidden": d, "vocab": vocab, "k": k, "charset": num_chars, "valid_spellings": int(table.canonical.sum()),
           "readout_width": readout_width, "rerank_k": args.rerank_k,
           "threads": torch.get_num_threads(), "quick": args.quick}, results, args.out)


if __name__ == "__main__":
    cli.run(main)
