"""Probe input: text a run trained on and unseen text of the same sources, as JSONL for ``--data``
of the analyses, to tell a fit short of capacity from one short of data.

    PYTHONPATH=. python experiments/pilots/fit_texts.py runs/fit-texts 1700   # OUT TRAIN_BLOCKS

For a default-corpus run with ``--train_blocks TRAIN_BLOCKS`` (seed 0, the default split), writes
``train.jsonl``: documents drawn at random from those whose every token lies in the run's training
blocks (``spellm_ds.data.packing.pack_documents``' order of whole documents, packing version 1:
the runs it was written for), and ``held_out.jsonl``: documents drawn at random
from the corpus's held-out split (the mixed-source documents the in-training evaluation reads).
Each drawn document is cut to its first ``CHARS`` characters, so that many documents, not a few
long ones, fill the ``--max_tokens`` positions and both files mix the sources alike. Scoring a model
on both shows how much better it agrees with the teacher on text it trained on than on unseen
text (the same documents for every model, so differences between models pair by position).
"""

import json
import random
import sys
from pathlib import Path

from spellm_ds.data import assets
from spellm_ds.data.packing import load_texts, split_documents
from spellm_ds.data.text_overlap import without_shared_sentences
from spellm_ds.distill.config import RunConfig

CHARS = 1000  # about 250 tokens of English
MAX_TOKENS = 8192  # the analyses' default positions


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + the EOS that packing adds


def trained_documents(texts: list[str], tokenizer, train_blocks: int, seq_len: int) -> list[str]:
    """The documents of the training stream that end inside its first ``train_blocks`` blocks."""
    kept, tokens = [], 0
    for text in texts:
        tokens += token_count(tokenizer, text)
        if tokens > train_blocks * seq_len:
            return kept
        kept.append(text)
    return kept


def sample(texts: list[str], tokenizer, max_tokens: int, seed: int = 0) -> list[str]:
    """Random documents' first ``CHARS`` characters (cut at a space) until they hold ``max_tokens``."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    drawn, tokens = [], 0
    for i in order:
        if tokens >= max_tokens:
            break
        text = texts[i] if len(texts[i]) <= CHARS else texts[i][:CHARS].rsplit(" ", 1)[0]
        drawn.append(text)
        tokens += token_count(tokenizer, text)
    return drawn


def main(out: Path, train_blocks: int) -> None:
    config = RunConfig()
    tokenizer = assets.load_tokenizer(assets.resolve_model(config.model))
    train, held_out = split_documents(load_texts(config.data, config.text_field)["text"], config.eval_fraction,
                                      config.seed)
    trained = trained_documents(without_shared_sentences(train, held_out), tokenizer, train_blocks, config.seq_len)
    out.mkdir(parents=True, exist_ok=True)
    for name, pool in (("train", trained), ("held_out", held_out)):
        documents = sample(pool, tokenizer, MAX_TOKENS + config.seq_len)
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": text}) + "\n" for text in documents)
        print(f"{out / name}.jsonl: {len(documents)} of {len(pool)} documents")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
