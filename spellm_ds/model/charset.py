"""The character vocabulary the char heads predict over.

Default: 105 symbols, in this order (ids in brackets):

- ``<end>`` [0]: after a token's last character, and padding up to k;
- ``<unk>`` [1]: any character outside the set after normalisation;
- the 95 printable ASCII characters ``' '`` .. ``'~'`` [2..96];
- newline [97] and tab [98];
- six reserved symbols ``<sp0>`` .. ``<sp5>`` [99..104] that spell special tokens (EOS, chat
  markers; see :mod:`spellm_ds.model.spelling`).

Extra characters (for example Cyrillic letters) are appended after these. Text is normalised
before lookup: Unicode NFKD, then combining marks are dropped (``é`` -> ``e``), as in the paper.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from spellm_ds.errors import SpellmError
from spellm_ds.hf.char_decoding import END_ID, UNK_ID

END = "<end>"
UNK = "<unk>"
NUM_RESERVED = 6
RESERVED = tuple(f"<sp{i}>" for i in range(NUM_RESERVED))
MAX_SYMBOLS = 256
"""Upper bound on |C|: keeps char ids in one byte and the heads small (k * |C| outputs)."""

_PRINTABLE_ASCII = [chr(c) for c in range(0x20, 0x7F)]
DEFAULT_CHARACTERS = tuple(_PRINTABLE_ASCII + ["\n", "\t"])
CHARSET_FILE = "charset.json"


def normalize(text: str) -> str:
    """NFKD, then drop combining marks: ``'Café'`` -> ``'Cafe'``, ``'ﬁ'`` -> ``'fi'``."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


@dataclass(frozen=True)
class Charset:
    """An ordered symbol list: ``symbols[i]`` is the symbol with char id ``i``."""

    symbols: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.symbols[:2] != (END, UNK) or not set(RESERVED) <= set(self.symbols):
            raise SpellmError(
                f"a charset must start with {END!r}, {UNK!r} and hold {RESERVED[0]}..{RESERVED[-1]}; "
                "build it with Charset.default()"
            )
        seen: set[str] = set()
        for symbol in self.symbols:
            if symbol in seen:
                raise SpellmError(f"charset symbol {symbol!r} appears twice; list each character once")
            seen.add(symbol)
        if len(self.symbols) > MAX_SYMBOLS:
            raise SpellmError(
                f"charset has {len(self.symbols)} symbols, more than the {MAX_SYMBOLS} allowed; "
                "drop rarely used characters"
            )
        object.__setattr__(self, "_ids", {s: i for i, s in enumerate(self.symbols)})

    # ----------------------------------------------------------------- construction
    @classmethod
    def default(cls, extra_characters: str = "") -> Charset:
        """The 105 default symbols, then ``extra_characters`` (each must be in normal form)."""
        extra = []
        for char in extra_characters:
            if normalize(char) != char:
                raise SpellmError(
                    f"extra character {char!r} changes under normalisation (to {normalize(char)!r}); "
                    "list it in its normalised form"
                )
            if char in DEFAULT_CHARACTERS:
                raise SpellmError(f"extra character {char!r} is already in the default charset; remove it")
            extra.append(char)
        return cls((END, UNK, *DEFAULT_CHARACTERS, *RESERVED, *extra))

    @classmethod
    def from_file(cls, path: str | Path) -> Charset:
        """A saved ``charset.json``, or a UTF-8 text file of extra characters (whitespace ignored)."""
        path = Path(path)
        if not path.is_file():
            raise SpellmError(f"charset file {path} does not exist; pass an existing file with --charset")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SpellmError(f"charset file {path} is not UTF-8 text; pass a charset.json or a text file of "
                              "characters with --charset") from None
        if path.suffix == ".json":
            try:
                symbols = json.loads(text)["symbols"]
            except (ValueError, KeyError, TypeError):
                raise SpellmError(f"{path} is not a charset.json (expected {{\"symbols\": [...]}}); "
                                  "pass one written by Charset.save or a plain text file of characters") from None
            return cls(tuple(symbols))
        return cls.default("".join(text.split()))

    # ----------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CHARSET_FILE
        path.write_text(json.dumps({"symbols": list(self.symbols)}, ensure_ascii=False, indent=0) + "\n",
                        encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Charset:
        return cls.from_file(Path(directory) / CHARSET_FILE)

    # ----------------------------------------------------------------- lookup
    def __len__(self) -> int:
        return len(self.symbols)

    def id_of(self, symbol: str) -> int:
        """Char id of one (already normalised) symbol; UNK when it is not in the set."""
        return self._ids.get(symbol, UNK_ID)  # type: ignore[attr-defined]

    def encode(self, text: str) -> list[int]:
        """Char ids of ``text`` after normalisation (no END appended)."""
        return [self.id_of(c) for c in normalize(text)]

    def decode(self, ids: list[int]) -> str:
        """Readable string for char ids, stopping at the first END (for reports and logs)."""
        out = []
        for i in ids:
            if i == END_ID:
                break
            out.append(self.symbols[i])
        return "".join(out)

    @property
    def reserved_ids(self) -> list[int]:
        return [self._ids[s] for s in RESERVED]  # type: ignore[attr-defined]
