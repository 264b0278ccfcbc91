"""Token id <-> k-character spelling, for any Hugging Face tokenizer.

``spelling(v)`` is the token's text after normalisation (:func:`spellm_ds.model.charset.normalize`), cut
to k characters, then END symbols up to k. How a token's text is recovered:

- byte-level BPE (GPT-2, Llama 3, SmolLM2): each symbol maps back to one byte (``Ġ`` = space,
  ``Ċ`` = newline); the bytes must be complete UTF-8;
- SentencePiece style: ``▁`` is a space, byte-fallback tokens ``<0xNN>`` are the byte NN;
- added tokens: their literal content; special tokens are spelled with one reserved symbol each,
  in the order EOS, BOS, PAD, UNK, then the other special tokens by id.

A token is *unspellable* when its text is not valid UTF-8 on its own (a partial multi-byte
character), holds a control character other than newline and tab, holds a character outside the
charset, is empty after normalisation, or is a special token beyond the reserved symbols.
Several tokens can share one k-character spelling (``é``/``e`` after normalisation, or long
tokens sharing their first k characters); the *canonical* token of a spelling is the one that
fits in k characters if any, then the lowest id (BPE gives frequent merges low ids), so lookup
is deterministic.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass

import torch

from spellm_ds.errors import SpellmError
from spellm_ds.hf.char_decoding import MAX_K, Spellings
from spellm_ds.model.charset import END_ID, UNK_ID, Charset

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable stand-in character -> byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return {char: b for b, char in mapping.items()}


_BYTE_LEVEL = _byte_level_decoder()


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    return '"ByteLevel"' in json.dumps(json.loads(backend.to_str()).get("decoder"))


def _raw_token_bytes(raw: str, byte_level: bool) -> bytes:
    if byte_level:
        if all(c in _BYTE_LEVEL for c in raw):
            return bytes(_BYTE_LEVEL[c] for c in raw)
        return raw.encode("utf-8")
    fallback = _BYTE_FALLBACK.match(raw)
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    return raw.replace("\u2581", " ").encode("utf-8")


def _valid_text(data: bytes) -> str | None:
    """The text of a token's bytes, or None for partial UTF-8 and control characters."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(unicodedata.category(c) == "Cc" and c not in "\n\t" for c in text):
        return None
    return text


def special_token_ids(tokenizer) -> list[int]:
    """Special tokens in the order they take reserved symbols: EOS, BOS, PAD, UNK, then by id."""
    ordered: list[int] = []
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id"):
        token_id = getattr(tokenizer, attr, None)
        if isinstance(token_id, int) and token_id not in ordered:
            ordered.append(token_id)
    others = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    others |= set(tokenizer.all_special_ids)
    ordered += sorted(others - set(ordered))
    return ordered


def token_texts(tokenizer, vocab_size: int) -> tuple[list[str | None], dict[int, int]]:
    """The text of token ids ``0..vocab_size-1`` (None if unspellable, and for the padding rows
    of a model whose vocabulary is larger than its tokenizer) and the special tokens'
    reserved-symbol ranks."""
    byte_level = _is_byte_level(tokenizer)
    known = min(vocab_size, len(tokenizer))
    raw_tokens = tokenizer.convert_ids_to_tokens(list(range(known))) + [None] * (vocab_size - known)
    added = {i: tok.content for i, tok in tokenizer.added_tokens_decoder.items()}
    texts: list[str | None] = []
    for token_id, raw in enumerate(raw_tokens):
        if token_id in added:
            texts.append(added[token_id])
        elif raw is None:
            texts.append(None)
        else:
            texts.append(_valid_text(_raw_token_bytes(raw, byte_level)))
    specials = {token_id: rank for rank, token_id in enumerate(special_token_ids(tokenizer)) if token_id < vocab_size}
    return texts, specials


def model_vocab_size(model_config) -> int:
    """Rows of a model's embedding and LM head: what token ids the teacher can emit. Qwen2, Pythia
    and many others pad it beyond ``len(tokenizer)``."""
    return model_config.get_text_config().vocab_size


@dataclass
class SpellingTable(Spellings):
    """:class:`~spellm_ds.hf.char_decoding.Spellings` built from a tokenizer and a charset, which it
    keeps for readable reports (an exported model carries the spellings alone)."""

    charset: Charset

    @classmethod
    def from_tokenizer(cls, tokenizer, charset: Charset, k: int, vocab_size: int) -> SpellingTable:
        """The table of a model with ``vocab_size`` output rows (:func:`model_vocab_size`; padded
        vocabularies have more rows than ``len(tokenizer)``, and those rows are unspellable)."""
        if not 1 <= k <= MAX_K:
            raise SpellmError(f"k={k} is out of range; choose 1 <= k <= {MAX_K} (the paper uses 10)")
        texts, specials = token_texts(tokenizer, vocab_size)
        reserved = charset.reserved_ids
        rows: list[list[int]] = []
        for token_id, text in enumerate(texts):
            if token_id in specials:
                rank = specials[token_id]
                ids = [reserved[rank]] if rank < len(reserved) else []
            else:
                ids = charset.encode(text) if text is not None else []
            if UNK_ID in ids:
                ids = []
            rows.append(ids)
        lengths = torch.tensor([len(ids) for ids in rows], dtype=torch.int64)
        chars = torch.tensor([ids[:k] + [END_ID] * (k - len(ids[:k])) for ids in rows], dtype=torch.int64)
        return cls.from_chars(len(charset), chars, lengths, charset=charset)

    def spelling_text(self, token_id: int) -> str:
        """Readable spelling of one token, for reports and logs."""
        return self.charset.decode(self.chars[token_id].tolist())

    def stats(self, corpus_counts: torch.Tensor | None = None) -> dict[str, float | int]:
        """Coverage figures of the spelling report; ``corpus_counts[v]`` = occurrences of token v."""
        vocab = self.vocab_size
        spellings, group_sizes = torch.unique(self.chars[self.spellable], dim=0, return_counts=True)
        result: dict[str, float | int] = {
            "k": self.k,
            "charset_size": len(self.charset),
            "vocab_size": vocab,
            "exactly_spellable": float(self.exact.sum()) / vocab,
            "truncated": float(self.truncated.sum()) / vocab,
            "unspellable": float((~self.spellable).sum()) / vocab,
            "shadowed_tokens": int((self.spellable & ~self.canonical).sum()),
            "colliding_spellings": int((group_sizes > 1).sum()),
            "distinct_spellings": len(spellings),
        }
        if corpus_counts is not None:
            counts = corpus_counts.to(torch.float64)
            result["corpus_tokens"] = int(counts.sum())
            result["corpus_exactly_spellable"] = float(counts[self.exact].sum() / counts.sum())
            result["corpus_truncated"] = float(counts[self.truncated].sum() / counts.sum())
            result["corpus_unspellable"] = float(counts[~self.spellable].sum() / counts.sum())
        return result
