"""Contexts where the teacher predicts rare tokens (issue 53 item 6): does the teacher copy natural
rare words from a list it has just read, and how many rare top-1 positions does such text yield
per token through the teacher, against plain text?

1. Words: spellable tokens that are a space and 3+ letters, that the training text holds (its
   first ``--texts`` documents) and that tokenize back to themselves, grouped by how often each
   was the teacher's top-1 in the baseline's training blocks (its teacher cache: the bands of the
   pilots' tables); up to ``--per_band`` of each band.
2. Texts: ``Here is a list of words: w1, w2, ..., wn.`` then ``The same list again: w1, ..., wn.``
   with ``--list_length`` words of one band, shuffled; built from token ids, so every word is its
   own token.
3. The teacher reads them. Copy rate: its top-1 at a word of the second list is that word; at
   the first list (nothing to copy) the same flag is the baseline. Yield: the share of all
   positions read whose top-1 falls in each band, against the pilots' 8,192 BoolQ dev positions.

    PYTHONPATH=. .venv/bin/python experiments/2026-12-07-copy-contexts/copy_rate.py runs/p53/base-hf runs/p53/base
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from analysis.collect import held_out_blocks
from analysis.common import rate
from analysis.label_frequency import training_top1_counts
from spellm_ds.data.corpus import training_texts
from spellm_ds.data.packing import token_counts
from spellm_ds.distill.metrics import BAND_EDGES, group_name, group_of
from spellm_ds.model.spellm import load


def band_yield(top1: torch.Tensor, counts: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per band of the top-1's training count: the share of positions, and the distinct tokens per
    1,000 positions (text that names the same rare token again teaches less)."""
    groups = group_of(counts[top1], BAND_EDGES)
    return {group_name(BAND_EDGES, i): {"share": float((groups == i).float().mean()),
                                        "distinct_per_1000": 1000 * len(top1[groups == i].unique()) / len(top1)}
            for i in range(len(BAND_EDGES))}


def natural_words(tokenizer, spelling_lengths: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """The spellable tokens that are a space and 3+ letters, occur in the text (``seen``: its
    :func:`token_counts`) and tokenize back to themselves."""
    words = []
    for token in (seen > 0).nonzero().squeeze(1).tolist():
        string = tokenizer.decode([token])
        if (spelling_lengths[token] > 0 and string[:1] == " " and len(string) >= 4 and string[1:].isalpha()
                and tokenizer(string)["input_ids"] == [token]):
            words.append(token)
    return torch.tensor(words)


def list_text(tokenizer, words: list[int]) -> tuple[list[int], dict[str, list[int]]]:
    """The token ids of ``Here is a list of words: w1, ..., wn.`` + ``The same list again: ...``,
    and where each list's words are."""
    ids, where = tokenizer("Here is a list of words:")["input_ids"], {"first_list": [], "second_list": []}
    comma = tokenizer(",")["input_ids"]
    for part, lead in (("first_list", []), ("second_list", tokenizer(".\nThe same list again:")["input_ids"])):
        ids += lead
        for i, word in enumerate(words):
            ids += comma if i else []
            where[part].append(len(ids))
            ids.append(word)
    return ids + tokenizer(".")["input_ids"], where


def top1_of(model, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
    lm_head = model.get_output_embeddings().weight
    return [(model.base.get_decoder()(ids[None]).last_hidden_state[0] @ lm_head.T).argmax(-1) for ids in blocks]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the baseline's export (its base model is the teacher)")
    parser.add_argument("run", help="the baseline's run directory (its teacher cache: the bands)")
    parser.add_argument("--texts", type=int, default=3000, help="training documents the words come from")
    parser.add_argument("--per_band", type=int, default=320)
    parser.add_argument("--list_length", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=8192)
    parser.add_argument("--out", default=str(Path(__file__).parent / "copy_rate.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    model = load(args.model)
    tokenizer = model.tokenizer
    vocab = len(model.spelling_lengths)
    counts = training_top1_counts(Path(args.run) / "teacher_cache", vocab)

    # 1: natural words, one token each, by band
    seen = token_counts(tokenizer, training_texts()[: args.texts], vocab)
    words = natural_words(tokenizer, model.spelling_lengths, seen)
    bands = group_of(counts[words], BAND_EDGES)
    rng = random.Random(0)

    # 2-3: list texts of one band each, read by the teacher
    results = {"model": args.model, "run": args.run, "settings": vars(args), "words": len(words), "by_band": {}}
    every_top1, flags_all = [], {"first_list": [], "second_list": []}
    for band in range(len(BAND_EDGES)):
        members = words[bands == band].tolist()
        rng.shuffle(members)
        members = members[: args.per_band]
        if not members:
            continue
        flags = {"first_list": [], "second_list": []}
        texts = [members[i : i + args.list_length] for i in range(0, len(members), args.list_length)]
        for chunk in texts:
            ids, where = list_text(tokenizer, chunk)
            top1 = top1_of(model, [torch.tensor(ids)])[0]
            every_top1.append(top1)
            for part, positions in where.items():
                predicted = top1[torch.tensor(positions) - 1]  # the prediction made one position before
                flags[part].append(predicted == torch.tensor(chunk))
        name = group_name(BAND_EDGES, band)
        results["by_band"][name] = {"words": len(members), "lists": len(texts),
                                    **{part: rate(torch.cat(f)) for part, f in flags.items()}}
        for part in flags:
            flags_all[part] += flags[part]
        print(name, json.dumps(results["by_band"][name]), flush=True)
    results["all_words"] = {part: rate(torch.cat(f)) for part, f in flags_all.items()}
    copy_top1 = torch.cat(every_top1)
    plain = torch.cat(top1_of(model, list(held_out_blocks(tokenizer, None, "text", 256, args.max_tokens))))
    results["yield"] = {"copy_texts": {"positions": len(copy_top1), "by_band": band_yield(copy_top1, counts)},
                        "boolq_dev": {"positions": len(plain), "by_band": band_yield(plain, counts)}}
    results["seconds"] = time.time() - started
    print(json.dumps(results["all_words"]), json.dumps(results["yield"]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
