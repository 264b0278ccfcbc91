import pytest
import torch

from spellm_ds.errors import SpellmError
from spellm_ds.model.charset import END_ID, Charset
from spellm_ds.model.spelling import SpellingTable
from tests import tiny
from tests.test_charset import CYRILLIC


def token_id(tokenizer, text: str) -> int:
    return tokenizer.convert_tokens_to_ids(tiny.byte_level_symbols(text))


@pytest.fixture(scope="module")
def table(byte_level_tokenizer):
    return SpellingTable.from_tokenizer(byte_level_tokenizer, Charset.default(), k=10, vocab_size=len(byte_level_tokenizer))


def spelled(table, tokenizer, text):
    i = token_id(tokenizer, text)
    return table.spelling_text(i), bool(table.spellable[i])


def test_byte_level_spellings(table, byte_level_tokenizer):
    tok = byte_level_tokenizer
    assert spelled(table, tok, " the") == (" the", True)
    assert spelled(table, tok, "\n") == ("\n", True)
    assert spelled(table, tok, "\n\n") == ("\n\n", True)
    assert spelled(table, tok, "123") == ("123", True)
    assert spelled(table, tok, "!?") == ("!?", True)
    assert spelled(table, tok, " café") == (" cafe", True)  # diacritic stripped
    assert spelled(table, tok, " Привет")[1] is False  # Cyrillic is UNK in the default charset
    assert spelled(table, tok, "\r")[1] is False  # control character
    partial = tok.convert_tokens_to_ids(tiny.byte_level_symbols("П")[0])  # first byte of a 2-byte char
    assert not table.spellable[partial]


def test_spelling_rows_are_end_padded(table, byte_level_tokenizer):
    row = table.chars[token_id(byte_level_tokenizer, " the")]
    assert row[4:].tolist() == [END_ID] * 6 and table.lengths[token_id(byte_level_tokenizer, " the")] == 4


def test_extended_charset_spells_cyrillic(byte_level_tokenizer):
    table = SpellingTable.from_tokenizer(byte_level_tokenizer, Charset.default(CYRILLIC), k=10, vocab_size=len(byte_level_tokenizer))
    assert spelled(table, byte_level_tokenizer, " Привет") == (" Привет", True)


def test_truncation_at_k_and_deterministic_collisions(table, byte_level_tokenizer):
    tok = byte_level_tokenizer
    long_a, long_b = token_id(tok, " internationalization"), token_id(tok, " internationally")
    assert table.spelling_text(long_a) == " internati"
    assert table.truncated[long_a] and table.truncated[long_b]
    # Both truncate to " internati": the lower id is canonical, and lookup returns it for both.
    assert table.canonical[min(long_a, long_b)] and not table.canonical[max(long_a, long_b)]
    assert table.lookup(table.chars[[long_a, long_b]]).tolist() == [min(long_a, long_b)] * 2
    # " café" and " cafe" share the spelling " cafe": the lower id (" café", added first) wins.
    cafe_accent, cafe = token_id(tok, " café"), token_id(tok, " cafe")
    assert cafe_accent < cafe
    assert table.lookup(table.chars[cafe].unsqueeze(0)).item() == cafe_accent
    rebuilt = SpellingTable.from_tokenizer(tok, Charset.default(), k=10, vocab_size=len(tok))
    assert torch.equal(rebuilt.canonical, table.canonical)


def test_a_token_that_fits_beats_a_truncated_one():
    tok = tiny.byte_level_tokenizer(extra_words=[" internati"])
    table = SpellingTable.from_tokenizer(tok, Charset.default(), k=10, vocab_size=len(tok))
    fits = token_id(tok, " internati")
    assert table.lookup(table.chars[token_id(tok, " internationally")]).item() == fits


def test_special_tokens_take_reserved_symbols(table, byte_level_tokenizer):
    tok = byte_level_tokenizer
    assert table.spelling_text(tok.eos_token_id) == "<sp0>"
    assert table.spelling_text(tok.bos_token_id) == "<sp1>"
    assert table.spelling_text(tok.pad_token_id) == "<sp2>"
    assert table.spelling_text(tok.convert_tokens_to_ids("<|tool|>")) == "<sp3>"
    assert table.lookup(table.chars[tok.eos_token_id]).item() == tok.eos_token_id


def test_sentencepiece_spellings(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    table = SpellingTable.from_tokenizer(tok, Charset.default(), k=10, vocab_size=len(tok))
    text = {t: table.spelling_text(tok.convert_tokens_to_ids(t)) for t in ("▁the", "▁café", "12", "<0x0A>", "<0x41>")}
    assert text == {"▁the": " the", "▁café": " cafe", "12": "12", "<0x0A>": "\n", "<0x41>": "A"}
    assert not table.spellable[tok.convert_tokens_to_ids("<0xD0>")]  # lone lead byte
    assert not table.spellable[tok.convert_tokens_to_ids("▁Привет")]
    # The byte-fallback "A" (lower id) and the token "A" collide; lookup is the lower id.
    assert table.lookup(table.chars[tok.convert_tokens_to_ids("A")]).item() == tok.convert_tokens_to_ids("<0x41>")


def test_lookup_misses_return_minus_one(table):
    generator = torch.Generator().manual_seed(0)
    random = torch.randint(2, 97, (500, 10), generator=generator)
    assert (table.lookup(random) == -1).all()
    assert table.lookup(torch.full((1, 10), END_ID)).item() == -1


def test_bad_k(byte_level_tokenizer):
    with pytest.raises(SpellmError, match="k=0 is out of range"):
        SpellingTable.from_tokenizer(byte_level_tokenizer, Charset.default(), k=0, vocab_size=len(byte_level_tokenizer))


def test_every_smollm2_token_round_trips(smollm2_tokenizer):
    """All spellable tokens, not a sample: canonical ones map to themselves, others to their twin."""
    table = SpellingTable.from_tokenizer(smollm2_tokenizer, Charset.default(), k=10, vocab_size=len(smollm2_tokenizer))
    found = table.lookup(table.chars)
    ids = torch.arange(table.vocab_size)
    assert torch.equal(found[table.canonical], ids[table.canonical])
    shadowed = table.spellable & ~table.canonical
    assert shadowed.any() and table.canonical[found[shadowed]].all()
    assert torch.equal(table.chars[found[shadowed]], table.chars[shadowed])
    assert (found[~table.spellable] == -1).all()
    stats = table.stats()
    assert stats["vocab_size"] == 49152 and 0.8 < stats["exactly_spellable"] < 0.95
    eos = smollm2_tokenizer.eos_token_id
    assert table.spelling_text(eos) == "<sp0>" and found[eos] == eos
