"""What the pilots' first 1,700 training blocks were made of, by source: the default corpus's
training split packed as the pilots were (whole documents shuffled, PACKING_VERSION 1), the two
list mixes of ``build_mix.py`` the same way, and the corpus packed since (documents cut into
shuffled pieces, :func:`spellm_ds.data.packing.shuffled_pieces`). Shares of tokens; ``lists``
are the mixes' list texts.

    PYTHONPATH=. .venv/bin/python experiments/2026-12-07-copy-contexts/composition.py runs/copy/mix.jsonl runs/copy/mix40.jsonl
"""

import collections
import json
import sys
from pathlib import Path

from spellm_ds.data import assets, corpus
from spellm_ds.data.packing import shuffled_pieces, split_documents
from spellm_ds.data.text_overlap import without_shared_sentences

BLOCKS, SEQ_LEN, EVAL_FRACTION, SEED = 1700, 256, 0.02, 0


def first_blocks_by_source(stream: list[tuple[str, str]], tokenizer) -> dict[str, float]:
    """Token shares by source of the first ``BLOCKS`` blocks of (text, source) packed in order."""
    budget, used, counts = BLOCKS * SEQ_LEN, 0, collections.Counter()
    for text, source in stream:
        take = min(len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1, budget - used)
        counts[source] += take
        used += take
        if used == budget:
            break
    return {source: round(count / budget, 4) for source, count in counts.most_common()}


def training_documents(texts: list[str]) -> list[str]:
    train, held_out = split_documents(texts, EVAL_FRACTION, SEED)
    return without_shared_sentences(train, held_out)


def main() -> None:
    tokenizer = assets.load_tokenizer(assets.embedded_model_dir())
    rows = assets.read_jsonl(corpus.corpus_dir() / "train.jsonl")
    source = {row["text"]: row["source"] for row in rows}
    documents = training_documents([row["text"] for row in rows])
    result = {"whole documents (the pilots)": first_blocks_by_source([(t, source[t]) for t in documents], tokenizer)}
    for mix in sys.argv[1:]:
        texts = [json.loads(line)["text"] for line in open(mix)]
        result[f"whole documents, {mix}"] = first_blocks_by_source(
            [(t, source.get(t, "lists")) for t in training_documents(texts)], tokenizer)
    of_piece = {piece: source[t] for t in documents for piece in shuffled_pieces([t], SEED)}
    pieces = shuffled_pieces(documents, SEED)
    result["pieces (since PACKING_VERSION 2)"] = first_blocks_by_source([(p, of_piece[p]) for p in pieces], tokenizer)
    chars = collections.Counter()
    for t in documents:
        chars[source[t]] += len(t)
    result["the whole training split (characters)"] = {s: round(c / sum(chars.values()), 4)
                                                       for s, c in chars.most_common()}
    (Path(__file__).parent / "composition.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
