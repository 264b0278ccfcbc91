"""The output head's time per step by path, bf16, 2 threads: the LM head's argmax, the package's
greedy pick (char heads, AutoCorrect on missed rows, the LM head on fallback rows) and the full
distribution the export's forward() computed (every valid spelling scored on every row). Random
hidden states (x3, so some rows fall back), 30 timed calls after 3 warm-ups.

    PYTHONPATH=. .venv/bin/python experiments/2026-12-07-decode-bf16/head_paths.py runs/p53v2/default/model
"""

import sys
import time

import torch

from spellm_ds.hf.char_decoding import greedy_tokens
from spellm_ds.model.spellm import load


def main(model_dir: str) -> None:
    torch.set_num_threads(2)
    model = load(model_dir, dtype="bfloat16")
    decoder, lm_head = model.char_decoder(0.22), model.get_output_embeddings()
    torch.manual_seed(0)
    for batch in (8, 32):
        hidden = torch.randn(batch, lm_head.weight.shape[1], dtype=torch.bfloat16) * 3

        def distribution():
            return decoder.mixture_log_probs(model.char_heads(hidden), hidden, lm_head, 0)

        def package_pick():
            char_logits = model.char_heads(hidden)
            proposal = decoder.propose(char_logits, autocorrect=False)
            host = torch.cat([proposal.fallback, proposal.hit]).cpu()
            return greedy_tokens(decoder, char_logits, hidden, lm_head, proposal, host[:batch], host[batch:])

        def lm_head_pick():
            return lm_head(hidden).float().argmax(-1)

        for name, step in (("LM head", lm_head_pick), ("package's greedy pick", package_pick),
                           ("full distribution (forward)", distribution)):
            with torch.no_grad():
                for _ in range(3):
                    step()
                started = time.perf_counter()
                for _ in range(30):
                    step()
            print(f"batch {batch}: {name}: {(time.perf_counter() - started) / 30 * 1e3:.2f} ms per step")


if __name__ == "__main__":
    main(sys.argv[1])
