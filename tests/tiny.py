"""Tiny tokenizers built locally with the `tokenizers` library (no hub, no files).

The byte-level one maps text to byte symbols with tokenizers' own ByteLevel pre-tokenizer, so the
tests do not reuse the mapping under test.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BYTE_LEVEL_WORDS = [
    " the", " café", " cafe", "\n", "\n\n", "123", "!?", " Привет", "\r",
    " internationalization", " internationally", "hello", " x",
]
SENTENCEPIECE_WORDS = ["▁the", "▁café", "12", "!", "▁Привет", "A"]


def byte_level_symbols(text: str) -> str:
    """``text`` in GPT-2 byte-level form (``' café'`` -> ``'ĠcafÃ©'``)."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return "".join(piece for piece, _ in pre.pre_tokenize_str(text))


def byte_level_tokenizer(extra_words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE: the 256 byte symbols, then the words above; EOS/BOS/PAD specials."""
    vocab: dict[str, int] = {}
    for symbol in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(symbol, len(vocab))
    vocab = {s: i for i, s in enumerate(sorted(vocab))}
    for word in BYTE_LEVEL_WORDS + (extra_words or []):
        vocab.setdefault(byte_level_symbols(word), len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>", bos_token="<|start|>",
                                   pad_token="<|pad|>", additional_special_tokens=["<|tool|>"])


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE: ``▁`` for spaces, byte fallback ``<0xNN>``, Metaspace."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for word in SENTENCEPIECE_WORDS:
        vocab[word] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
