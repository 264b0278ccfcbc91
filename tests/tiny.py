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


def corpus_texts(n: int = 300) -> list[str]:
    """Real English for tiny runs: the first ``n`` passages of the embedded corpus."""
    from spellm_ds.data import corpus

    return corpus.boolq_training_articles()[:n]


def trained_tokenizer(texts: list[str], vocab_size: int = 400, metaspace: bool = False) -> PreTrainedTokenizerFast:
    """A BPE trained on ``texts`` (deterministic), with an EOS token: byte-level, or with
    ``metaspace`` SentencePiece-style (``▁`` for spaces, an unknown token for unseen characters)."""
    from tokenizers import trainers

    if metaspace:
        backend = Tokenizer(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        specials, alphabet = ["<|endoftext|>", "<unk>"], []
    else:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        specials, alphabet = ["<|endoftext|>"], pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


FAMILIES = ("llama", "gpt2", "qwen2")
"""Tiny configs of the model families every model-facing path is tested on: Llama (rotary, tied
head), GPT-2 (learned absolute positions added to the embeddings, ``h`` blocks) and Qwen2 (untied
head, a vocabulary padded beyond the tokenizer, a sliding-window layer)."""


def tiny_model_dir(directory, texts: list[str], family: str = "llama", layers: int = 4, hidden: int = 64,
                   seed: int = 0):
    """A random tiny model of ``family`` with a tokenizer trained on ``texts``, saved as an HF directory."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = trained_tokenizer(texts)
    ids = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    if family == "llama":
        model_class = LlamaForCausalLM
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512, tie_word_embeddings=True, **ids)
    elif family == "gpt2":
        model_class = GPT2LMHeadModel
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, **ids)
    elif family == "qwen2":
        model_class = Qwen2ForCausalLM
        config = Qwen2Config(vocab_size=len(tokenizer) + 37, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512, tie_word_embeddings=False, use_sliding_window=True,
                             sliding_window=16, max_window_layers=layers - 1, **ids)
    else:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    torch.manual_seed(seed)
    model = model_class(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_llama_dir(directory, texts: list[str], layers: int = 4, hidden: int = 64, seed: int = 0):
    """A random tiny Llama with a tokenizer trained on ``texts``, saved as an HF directory."""
    return tiny_model_dir(directory, texts, "llama", layers, hidden, seed)


def tiny_setup(root, n_texts: int = 150, layers: int = 4, family: str = "llama"):
    """A tiny model directory and a ``.txt`` corpus (one passage per paragraph) under ``root``."""
    from pathlib import Path

    root = Path(root)
    texts = corpus_texts(n_texts)
    data = root / "corpus.txt"
    data.write_text("\n\n".join(t.replace("\n\n", "\n") for t in texts))
    return tiny_model_dir(root / "base", texts, family, layers=layers), data


def spellm_dir(directory, base_dir, std: float | None = None, **settings):
    """An exported SpeLLM model around the base model in ``base_dir`` with untrained heads (their
    projection drawn from N(0, ``std``) when given, for heads that decide something), recording the
    token counts of 60 corpus passages as its training text's (the shortlist ranks by them)."""
    import torch

    from spellm_ds.data.assets import load_tokenizer
    from spellm_ds.model.spellm import save_export, untrained

    ids = [i for text in corpus_texts(60) for i in load_tokenizer(base_dir)(text)["input_ids"]]
    model = untrained(base_dir, token_counts=torch.bincount(torch.tensor(ids)), **settings)
    if std is not None:
        torch.manual_seed(0)
        torch.nn.init.normal_(model.char_heads.proj.weight, std=std)
    save_export(model, directory, model.tokenizer, base_dir)
    return directory


def student(base, **settings):
    """A distillation's student around ``base`` (the default charset)."""
    from spellm_ds.model.charset import Charset
    from spellm_ds.model.spellm import Student, spellm_config

    return Student(base, spellm_config(base.config, Charset.default(), **settings))
