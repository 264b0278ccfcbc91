"""Which texts share a passage: evaluation text must be text no training run has seen.

Two texts share a sentence (or any passage) of ``SHARED_TEXT_CHARS``+ characters exactly when
they share a window of that many characters starting at a word, in the normalised form (lower
case, whitespace collapsed). The corpus builder drops training paragraphs that share one with
evaluation text, and every run drops training documents that share one with its held-out ones.
"""

from __future__ import annotations

SHARED_TEXT_CHARS = 60


def normalized(text: str) -> str:
    """Lower case, whitespace collapsed: the form texts are compared in."""
    return " ".join(text.lower().split())


def text_windows(text: str, width: int = SHARED_TEXT_CHARS) -> set[str]:
    """Every ``width``-character window of the normalised text that starts at a word: two texts
    share a sentence (or any passage) of ``width``+ characters exactly when they share a window."""
    flat = normalized(text)
    starts = [0] + [i + 1 for i, c in enumerate(flat) if c == " "]
    return {flat[i : i + width] for i in starts if i + width <= len(flat)}


def without_shared_sentences(texts: list[str], held_out: list[str]) -> list[str]:
    """``texts`` less every document that shares 60+ characters of text with ``held_out`` (the
    same passage under another title, a sentence two articles have in common): evaluation text
    must be unseen text."""
    reserved = set().union(*map(text_windows, held_out)) if held_out else set()
    return [text for text in texts if reserved.isdisjoint(text_windows(text))]
