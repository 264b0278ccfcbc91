import json

import pytest

from spellm_ds.errors import SpellmError
from spellm_ds.model.charset import END_ID, RESERVED, UNK_ID, Charset, normalize

CYRILLIC = "абвгдежзиклмнопрстуфхцчшщъыьэюяАБВГДЕЖЗИКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ"


def test_default_charset_is_the_documented_105_symbols():
    charset = Charset.default()
    assert len(charset) == 105
    assert charset.symbols[END_ID] == "<end>" and charset.symbols[UNK_ID] == "<unk>"
    assert charset.symbols[2:97] == tuple(chr(c) for c in range(0x20, 0x7F))
    assert charset.symbols[97:99] == ("\n", "\t")
    assert charset.symbols[99:] == RESERVED


def test_normalisation_strips_diacritics_and_unknowns_become_unk():
    assert normalize("Café naïve Ångström") == "Cafe naive Angstrom"
    charset = Charset.default()
    assert charset.encode("é!") == [charset.id_of("e"), charset.id_of("!")]
    assert charset.encode("Пx") == [UNK_ID, charset.id_of("x")]
    assert Charset.default(CYRILLIC).encode("П")[0] not in (UNK_ID, END_ID)


def test_save_load_round_trip_keeps_ids(tmp_path):
    charset = Charset.default(CYRILLIC)
    charset.save(tmp_path)
    loaded = Charset.load(tmp_path)
    assert loaded == charset
    assert loaded.encode("Привет, мир") == charset.encode("Привет, мир")


def test_text_file_of_extra_characters(tmp_path):
    path = tmp_path / "cyrillic.txt"
    path.write_text("а б в\nг\n", encoding="utf-8")
    charset = Charset.from_file(path)
    assert charset.symbols[105:] == ("а", "б", "в", "г")


@pytest.mark.parametrize("content, message", [
    ("ааб", "appears twice"),
    ("".join(chr(0x4E00 + i) for i in range(200)), "more than the 256 allowed"),
    ("é", "changes under normalisation"),
    ("a", "already in the default charset"),
])
def test_bad_charset_files_fail_clearly(tmp_path, content, message):
    path = tmp_path / "extra.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SpellmError, match=message):
        Charset.from_file(path)


def test_saved_charset_with_duplicates_fails(tmp_path):
    symbols = list(Charset.default().symbols) + ["a"]
    (tmp_path / "charset.json").write_text(json.dumps({"symbols": symbols}))
    with pytest.raises(SpellmError, match="'a' appears twice"):
        Charset.load(tmp_path)
