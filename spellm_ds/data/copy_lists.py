"""Copy lists (``--copy_lists SHARE``, beyond the paper): training text in which the teacher's
top-1 is a word drawn uniformly from the training text's words, not by how often it occurs.

A list text reads ``Here is a list of words: w1, ..., wn.`` then ``The same list again: w1, ...,
wn.``. On the second reading the teacher copies the list: measured on SmolLM2-135M, its top-1 at a
word of the second list is that word 89% of the time (0.2% on the first reading), rare words alike
(``experiments/2026-12-07-copy-contexts``). Natural text names rare words rarely, so the char heads
see them rarely; here every word of the text is drawn as often as every other.

The lists are packed into blocks of their own, interleaved with the natural text's blocks so that
every prefix of the training blocks holds ``SHARE`` of list blocks (rounded down): with
``--train_blocks N`` the natural text read is the first ``N - share x N`` blocks a run without
lists reads.

Off by default: at 435k teacher tokens, ``--copy_lists 0.25`` cost 1.3 points of raw agreement with
the teacher and taught the rare tokens nothing (``experiments/2026-12-07-copy-contexts``).
"""

from __future__ import annotations

import random
import re

import torch

from spellm_ds.errors import SpellmError

WORD = re.compile(r" [^\W\d_]{3,}")
"""A word token's text: a space and three or more letters."""
LIST_LENGTH = 16


def word_tokens(tokenizer, counts: torch.Tensor) -> list[str]:
    """The texts of the tokens that are a space and 3+ letters, occur in the text (``counts``:
    :func:`spellm_ds.data.packing.token_counts`) and come back as the same single token after a
    comma (``, word``: how a list writes them), by token id."""
    comma = tokenizer(",", add_special_tokens=False)["input_ids"]
    after = len(tokenizer.decode(comma))
    words = []
    for token in (counts > 0).nonzero().squeeze(1).tolist():
        text = tokenizer.decode(comma + [token])[after:]  # after a comma, so a leading space is kept
        if WORD.fullmatch(text) and tokenizer("," + text, add_special_tokens=False)["input_ids"] == comma + [token]:
            words.append(text)
    return words


def list_text(words: list[str]) -> str:
    """A list text of ``words`` (each with its leading space)."""
    listed = ",".join(words)
    return f"Here is a list of words:{listed}.\nThe same list again:{listed}."


def list_blocks(words: list[str], tokenizer, seq_len: int, num_blocks: int, seed: int) -> torch.Tensor:
    """``[num_blocks, seq_len]`` blocks of list texts joined by EOS, each of ``LIST_LENGTH`` words
    (all of them, if fewer) drawn without replacement from ``words`` by a ``seed``-ed generator."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rng = random.Random(seed)
    stream: list[int] = []
    while len(stream) < num_blocks * seq_len:
        text = list_text(rng.sample(words, min(LIST_LENGTH, len(words))))
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
    return torch.tensor(stream[: num_blocks * seq_len], dtype=torch.int64).view(num_blocks, seq_len)


def list_rows(total: int, share: float) -> torch.Tensor:
    """``[total]`` bool: block i is a list block where ``floor((i + 1) x share)`` steps up, so that
    every prefix of ``n`` blocks holds ``floor(n x share)`` of them."""
    steps = torch.floor(torch.arange(total + 1, dtype=torch.float64) * share)
    return steps[1:] > steps[:-1]


def with_copy_lists(natural: torch.Tensor, counts: torch.Tensor, tokenizer, share: float, max_blocks: int | None,
                    seed: int) -> torch.Tensor:
    """The training blocks ``natural`` with list blocks of the words of their documents (``counts``:
    every token's count in them) interleaved (:func:`list_rows`): as many blocks as ``max_blocks``
    (or every natural block) allows."""
    words = word_tokens(tokenizer, counts)
    if not words:
        raise SpellmError("--copy_lists found no word tokens (a space and 3+ letters) in the training text; add "
                          "text of words or drop --copy_lists")
    total = int(len(natural) / (1 - share)) + 1
    if max_blocks is not None:
        total = min(total, max_blocks)
    while int((~list_rows(total, share)).sum()) > len(natural):  # the + 1 and float rounding
        total -= 1
    rows = list_rows(total, share)
    blocks = torch.empty(total, natural.shape[1], dtype=natural.dtype)
    blocks[rows] = list_blocks(words, tokenizer, natural.shape[1], int(rows.sum()), seed)
    blocks[~rows] = natural[: int((~rows).sum())]
    return blocks
