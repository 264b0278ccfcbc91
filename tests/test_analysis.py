"""Analysis metrics on constructed cases with hand-known answers, and the report CLI."""

import argparse
import json

import pytest
import torch

from analysis import blending, entropy, label_frequency, likelihood, match_rates
from analysis.collect import Analysis, Records
from analysis.common import correct_flags
from spellm_ds.distill.teacher import TeacherSignal
from spellm_ds.distill.teacher_cache import TeacherCache
from spellm_ds.model.charset import Charset
from spellm_ds.model.spelling import SpellingTable
from tests import tiny
from tests.entry_points import run_module

K = 8


@pytest.fixture(scope="module")
def table(byte_level_tokenizer):
    return SpellingTable.from_tokenizer(byte_level_tokenizer, Charset.default(), k=K, vocab_size=len(byte_level_tokenizer))


def tok(tokenizer, text):
    return tokenizer.convert_tokens_to_ids(tiny.byte_level_symbols(text))


def chars(table, text):
    ids = table.charset.encode(text)[:K]
    return ids + [0] * (K - len(ids))


def make(table, tokenizer, rows, tau=0.5, next_token=None):
    """rows: (predicted text, [top-5 texts], student entropy, teacher entropy, fallback token text);
    next_token: the next token's (id, teacher, heads, LM-head log-prob) columns (default: none)."""
    n = len(rows)
    next_ids, teacher_logp, heads_logp, lm_logp = next_token or (torch.full((n,), -1), *torch.zeros(3, n))
    top = torch.tensor([[tok(tokenizer, t) for t in cands] for _, cands, *_ in rows])
    raw = torch.tensor([chars(table, p) for p, *_ in rows])
    looked = table.lookup(raw)
    records = Records(
        top_ids=top, top_probs=torch.full((n, 5), 0.2), teacher_entropy=torch.tensor([r[3] for r in rows]),
        raw_chars=raw, hit=looked >= 0, autocorrected=torch.where(looked >= 0, looked, top[:, 4]),
        fallback_token=torch.tensor([tok(tokenizer, r[4]) for r in rows]),
        student_entropy=torch.tensor([r[2] for r in rows]), label_chars=table.chars[top[:, 0]],
        label_valid=torch.ones(n, dtype=torch.bool), next_ids=torch.as_tensor(next_ids),
        teacher_next_logp=torch.as_tensor(teacher_logp), heads_next_logp=torch.as_tensor(heads_logp),
        lm_next_logp=torch.as_tensor(lm_logp))
    return Analysis(records, table, tau, 0, 0, "teacher", torch.zeros(table.vocab_size), None, 1)  # independent rows


CANDS = [" the", " cafe", "hello", " x", "123"]


def test_exact_prefix_and_match_at_5(table, byte_level_tokenizer):
    rows = [
        (" the", CANDS, 0.1, 1.0, " the"),  # exact
        (" internat", [" internationalization"] + CANDS[1:], 0.1, 1.0, " the"),  # prefix (cut at k=8)
        ("hello", CANDS, 0.1, 1.0, " the"),  # top-3: match@5 only
        ("zzzz", CANDS, 0.9, 1.0, " the"),  # invalid; falls back to the right token
        # falls back; the LM head names the teacher's top-1, which is longer than k: a prefix match
        ("zzzz", [" internationalization"] + CANDS[1:], 0.9, 1.0, " internationalization"),
    ]
    analysis = make(table, byte_level_tokenizer, rows)
    raw = correct_flags(analysis, "raw")
    assert raw["exact"].tolist() == [True, False, False, False, False]
    assert raw["prefix"].tolist() == [False, True, False, False, False]
    assert raw["at5"].tolist() == [True, True, True, False, False]  # match@5 counts the prefix match too
    with_fallback = correct_flags(analysis, "autocorrect_fallback")
    assert with_fallback["exact"].tolist() == [True, False, False, True, False]
    assert with_fallback["prefix"].tolist() == [False, True, False, False, True]
    assert with_fallback["at5"].tolist() == [True, True, True, True, True]
    result = match_rates.compute(analysis)
    assert result["raw"]["exact_or_prefix"]["rate"] == 0.4 and result["raw"]["at5"]["count"] == 3
    assert result["autocorrect_fallback"]["exact_or_prefix"]["count"] == 4
    assert result["autocorrect_fallback"]["fallback_rate"]["count"] == 2
    # the ceiling: every row through the LM head, which names " the" for rows 1-4 and the long top-1 for row 5
    assert result["fallback_ceiling"]["exact"]["count"] == 3  # rows 1, 3, 4
    assert result["fallback_ceiling"]["prefix"]["count"] == 1  # row 5
    assert result["fallback_ceiling"]["at5"]["count"] == 4  # row 2's top-5 holds no " the"
    assert result["summary"]["fallback_ceiling"] == {"top1": 0.8, "top5": 0.8}
    # the Wilson 95% score interval of 2/5, written out
    z = 1.96
    centre, half = (0.4 + z * z / 10) / (1 + z * z / 5), z * (0.24 / 5 + z * z / 100) ** 0.5 / (1 + z * z / 5)
    assert result["raw"]["exact_or_prefix"]["ci95"] == pytest.approx([centre - half, centre + half], rel=1e-9)


def test_blend_and_non_blend(table, byte_level_tokenizer):
    rows = [
        (" ello", CANDS, 0.1, 0.1, " the"),  # ' ' from " cafe"/" the", "ello" from "hello": a blend
        ("zzzz", CANDS, 0.1, 3.0, " the"),  # invalid, not a blend
        (" cafe", CANDS, 0.1, 3.0, " the"),  # a candidate: explained, not a blend
    ]
    result = blending.compute(make(table, byte_level_tokenizer, rows))
    assert result["blending"]["count"] == 1
    assert result["top_blends"][0]["blend"] == " ello"
    assert result["top_blends"][0]["from"] == [" the", "hello"]
    low_bin = result["by_teacher_entropy"][0]
    assert low_bin["count"] == 1 and low_bin["n"] == 1


def test_entropy_bins_threshold_and_correlation(table, byte_level_tokenizer):
    # 10 positions: the char heads are right when entropy < 0.5, the LM head is always right.
    rows = [(" the" if e < 0.5 else "zzzz", CANDS, e, 2 * e, " the") for e in [i / 10 for i in range(10)]]
    analysis = make(table, byte_level_tokenizer, rows, tau=0.5)
    args = argparse.Namespace(target_accuracy=1.0, max_fallback_rate=0.3)
    result = entropy.compute(analysis, args)
    assert [b["accuracy"] for b in result["bins"]] == [1.0] * 5 + [0.0] * 5
    assert result["at_tau"] == {"tau": 0.5, "accuracy": 1.0, "fallback_rate": 0.5, "best_possible_accuracy": 1.0}
    assert result["threshold_for_target_accuracy"]["tau"] == pytest.approx(0.5)
    budget = result["threshold_for_fallback_budget"]
    assert budget["fallback_rate"] == pytest.approx(0.3) and budget["accuracy"] == pytest.approx(0.8)
    assert result["pearson_teacher_student"] == pytest.approx(1.0)
    assert result["spearman_teacher_student"] == pytest.approx(1.0)
    assert budget["best_possible_accuracy"] == pytest.approx(0.8)  # entropy here is the perfect signal


def test_best_possible_fallback_beats_a_misleading_signal(table, byte_level_tokenizer):
    # The char heads are right exactly where they are unsure, the LM head everywhere but row 0.
    rows = [("zzzz" if e < 0.5 else " the", CANDS, e, e, " x" if e == 0 else " the") for e in [i / 10 for i in range(10)]]
    point = entropy.tradeoff(make(table, byte_level_tokenizer, rows, tau=0.5), [0.5])[0]
    assert point["fallback_rate"] == pytest.approx(0.5) and point["accuracy"] == pytest.approx(0.5)
    # an oracle falls back rows 1-4 (heads wrong, LM head right) and one row both get right
    assert point["best_possible_accuracy"] == pytest.approx(0.9)


def test_next_token_likelihood_against_the_teacher(table, byte_level_tokenizer):
    # rows 0-1: the heads decide (entropy 0.1 < tau), rows 2-3 fall back; row 1's next token has no
    # spelling; row 4 is a block's last position (no next token)
    the, cafe = tok(byte_level_tokenizer, " the"), tok(byte_level_tokenizer, " cafe")
    rows = [(" the", CANDS, 0.1, 1.0, " the"), (" the", CANDS, 0.1, 1.0, " the"), ("zzzz", CANDS, 0.9, 1.0, " the"),
            ("zzzz", CANDS, 0.9, 1.0, " the"), (" the", CANDS, 0.1, 1.0, " the")]
    next_token = (torch.tensor([cafe, the, the, cafe, -1]), torch.tensor([-1.0, -1.0, -2.0, -3.0, -1.0]),
                  torch.tensor([-9.0, float("-inf"), -0.5, -4.0, -1.0]), torch.tensor([-2.0, -1.0, -1.5, -3.5, -1.0]))
    analysis = make(table, byte_level_tokenizer, rows, tau=0.5, next_token=next_token)
    nll = likelihood.spellm_nll(analysis, 0.5)
    assert nll[[0, 2, 3]].tolist() == [9.0, 1.5, 3.5] and nll[[1, 4]].isnan().all()
    result = likelihood.compute(analysis)
    assert (result["positions"], result["scored"], result["unspellable_next"]) == (4, 3, 1)
    assert result["teacher_nll"] == pytest.approx(2.0)
    assert result["spellm"]["nll"] == pytest.approx(14 / 3) and result["spellm"]["fallback_rate"] == pytest.approx(2 / 3)
    diffs = torch.tensor([8.0, -0.5, 0.5])
    half = 1.96 * diffs.std().item() / 3 ** 0.5
    versus = result["spellm"]["vs_teacher"]
    assert versus["diff"] == pytest.approx(8 / 3) and versus["ci95"] == pytest.approx([8 / 3 - half, 8 / 3 + half])
    assert versus["n"] == 3
    assert result["heads_everywhere"]["nll"] == pytest.approx(13.5 / 3)
    assert result["lm_head_everywhere"]["vs_teacher"]["diff"] == pytest.approx(1 / 3)
    # where the heads decide (row 0), the next token " cafe" is not the heads' " the": 8 nats above the teacher
    assert result["heads_decide"] == {"positions": 1, "next_is_heads_token": 0.0, "teacher_nll": 1.0,
                                      "heads_nll": 9.0, "median_gap_elsewhere": 8.0}
    sweep = {point["tau"]: point for point in result["tau_sweep"]}
    # the scored rows' entropies are 0.1, 0.9, 0.9: the 80/90/95% thresholds are their 20/10/5% quantiles
    matched = result["at_fallback_rates"]
    assert [p["target"] for p in matched] == [0.8, 0.9, 0.95]
    assert [p["tau"] for p in matched] == pytest.approx([0.42, 0.26, 0.18])
    assert all(p["fallback_rate"] == pytest.approx(2 / 3) for p in matched)
    assert sweep[0.03]["fallback_rate"] == 1.0 and sweep[0.03]["nll"] == pytest.approx(7 / 3)  # the LM head's


def test_report_writes_every_file_and_matches_single_modules(tmp_path, monkeypatch, capfd):
    from transformers import AutoModelForCausalLM

    from spellm_ds.data.assets import load_tokenizer
    from spellm_ds.model.spellm import load

    texts = tiny.corpus_texts(60)
    base_dir = tiny.tiny_llama_dir(tmp_path / "base", texts)
    tiny.spellm_dir(tmp_path / "spellm", base_dir, std=0.3, k=6, trainable_layers=2)
    data = tmp_path / "held_out.txt"
    data.write_text("\n\n".join(t.replace("\n\n", "\n") for t in tiny.corpus_texts(200)[150:]))
    common = ["--model", str(tmp_path / "spellm"), "--data", str(data), "--max_tokens", "600", "--seq_len", "64"]

    def module(name, *extra):  # in this process, as `python -m analysis.NAME` would run it
        result = run_module(f"analysis.{name}", [*common, *extra], monkeypatch, capfd)
        assert result.returncode == 0, result.stderr[-3000:]

    module("report", "--out", str(tmp_path / "report"))
    for name in ("report.json", "report.md", "entropy.png", "blending.png", "token_length.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0, name
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["match_rates"]["positions"] == 640
    for name in ("match_rates", "blending", "token_length", "likelihood"):
        module(name, "--out", str(tmp_path / f"{name}.json"))
        assert json.loads((tmp_path / f"{name}.json").read_text()) == report[name], name
    assert "| raw |" in (tmp_path / "report" / "report.md").read_text()
    module("report", "--tau", "none", "--out", str(tmp_path / "never"))  # never fall back
    never = json.loads((tmp_path / "never" / "report.json").read_text())["match_rates"]
    assert never["tau"] is None and never["autocorrect_fallback"]["fallback_rate"]["count"] == 0
    assert never["autocorrect_fallback"]["exact_or_prefix"] == never["autocorrect"]["exact_or_prefix"]
    # the next token's likelihood, against one independent teacher forward over the same blocks
    from analysis.collect import held_out_blocks

    blocks = held_out_blocks(load_tokenizer(base_dir), [str(data)], "text", 64, 600)
    with torch.no_grad():
        teacher_logits = AutoModelForCausalLM.from_pretrained(base_dir)(blocks).logits.float()
    logp = torch.log_softmax(teacher_logits[:, :-1], -1)
    nexts = blocks[:, 1:]
    table = load(tmp_path / "spellm").spelling
    teacher_nll = -logp.gather(-1, nexts.unsqueeze(-1)).squeeze(-1)[table.spellable[nexts]]
    lik = report["likelihood"]
    assert lik["positions"] == 10 * 63 and lik["scored"] == len(teacher_nll)
    assert lik["teacher_nll"] == pytest.approx(teacher_nll.mean().item(), rel=1e-4)
    # the converted model's trainable layers are still the teacher's: its LM head is the teacher's
    assert abs(lik["lm_head_everywhere"]["vs_teacher"]["diff"]) < 1e-4
    assert lik["heads_everywhere"]["vs_teacher"]["diff"] > 1  # random char heads
    never_lik = json.loads((tmp_path / "never" / "report.json").read_text())["likelihood"]
    assert never_lik["spellm"]["nll"] == pytest.approx(never_lik["heads_everywhere"]["nll"])
    # re-ranking every valid spelling by the student's LM head, which is still the teacher's: the
    # char path names the teacher's best nameable token
    module("match_rates", "--tau", "none", "--rerank_k", "1000000", "--out", str(tmp_path / "reranked.json"))
    reranked = json.loads((tmp_path / "reranked.json").read_text())
    top1 = teacher_logits.argmax(-1).flatten()
    named = teacher_logits.masked_fill(~table.canonical, float("-inf")).argmax(-1).flatten()
    expected = ((table.chars[named] == table.chars[top1]).all(-1) & table.spellable[top1]).double().mean().item()
    assert reranked["rerank_k"] == 1000000 and expected > 0.5
    assert reranked["autocorrect"]["exact_or_prefix"]["rate"] == pytest.approx(expected)
    assert reranked["raw"] == json.loads((tmp_path / "match_rates.json").read_text())["raw"]  # raw is not re-ranked
    # ... and the heads' likelihood is then the teacher's, renormalised over the spellings they can name
    module("likelihood", "--tau", "none", "--rerank_k", "1000000", "--out", str(tmp_path / "reranked_lik.json"))
    reranked_lik = json.loads((tmp_path / "reranked_lik.json").read_text())
    named_logp = torch.log_softmax(teacher_logits[:, :-1].masked_fill(~table.canonical, float("-inf")), -1)
    as_spelled = named_logp.gather(-1, table.lookup(table.chars[nexts]).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert reranked_lik["heads_everywhere"]["nll"] == pytest.approx(-as_spelled[table.spellable[nexts]].mean().item(),
                                                                    rel=1e-4)


def test_match_by_how_often_the_teachers_top1_was_its_top1_in_training(table, byte_level_tokenizer, tmp_path):
    the, cafe, hello = (tok(byte_level_tokenizer, t) for t in (" the", " cafe", "hello"))
    cafe_first = [" cafe", " the", "hello", " x", "123"]
    hello_first = ["hello", " the", " cafe", " x", "123"]
    rows = [(" the", CANDS, 0.1, 1.0, " the"), ("zzzz", CANDS, 0.1, 1.0, " the"),  # seen 5,000 times: 1 of 2
            (" cafe", cafe_first, 0.1, 1.0, " the"), ("zz", cafe_first, 0.1, 1.0, " the"),
            ("zz", cafe_first, 0.1, 1.0, " the"),  # never seen: 1 of 3, all 5 characters long
            ("hello", hello_first, 0.1, 1.0, " the")]  # seen 20 times: 1 of 1
    counts = torch.zeros(table.vocab_size, dtype=torch.long)
    counts[the], counts[hello] = 5000, 20
    analysis = make(table, byte_level_tokenizer, rows)
    analysis.records.label_chars[2] = table.chars[the]  # this position trained towards its second candidate
    result = label_frequency.compute_from_counts(analysis, counts)
    bands = {b["band"]: b for b in result["bands"]}
    assert list(bands) == ["0", "1-9", "10-99", "100-999", "1000-9999", ">=10000"]
    assert [bands[name]["n"] for name in bands] == [3, 0, 1, 0, 2, 0] and result["positions"] == 6
    assert bands["0"]["raw"]["rate"] == pytest.approx(1 / 3) and bands["0"]["share"] == 0.5
    assert bands["0"]["raw_5_or_longer"]["n"] == 3 and bands["0"]["raw_shorter_than_5"]["n"] == 0
    assert bands["10-99"]["raw"]["rate"] == 1.0 and bands["1000-9999"]["raw"]["rate"] == 0.5
    assert bands["1000-9999"]["raw_shorter_than_5"]["rate"] == 0.5  # " the" is 4 characters
    assert result["summary"]["raw"] == 0.5 and result["training_positions"] == 5020
    assert bands["0"]["label_is_top1"] == pytest.approx(2 / 3) and bands["1000-9999"]["label_is_top1"] == 1.0
    lengths = {b["length"]: b for b in result["lengths"]}  # " the" has 4 characters, " cafe" and "hello" 5
    assert (lengths["3-4"]["n"], lengths["5"]["n"], lengths["1"]["n"]) == (2, 4, 0)
    assert lengths["3-4"]["raw"]["rate"] == 0.5 and lengths["5"]["raw"]["rate"] == 0.5
    assert lengths["5"]["label_is_top1"] == 0.75 and result["summary"]["label_is_top1"] == pytest.approx(5 / 6)

    # the counts, read from a teacher cache's training entries: top-1 only, every stored block
    cache = TeacherCache(tmp_path / "teacher_cache", {"test": 1})
    cache.prepare()
    top_ids = torch.tensor([[[the, cafe, 0, 0, 0]] * 3 + [[hello, the, 0, 0, 0]],
                            [[cafe, the, 0, 0, 0]] * 2 + [[the, hello, 0, 0, 0]] * 2])
    signal = TeacherSignal(top_ids, torch.full((2, 4, 5), 0.2), torch.ones(2, 4))
    cache.write("train", [0, 7], signal, None, [True, True])
    cache.write("held_out", [0], signal, None, [True])  # not training: not counted
    read = label_frequency.training_top1_counts(cache.directory, table.vocab_size)
    assert (read[the], read[hello], read[cafe], int(read.sum())) == (5, 1, 2, 8)


def test_pilot_columns_split_by_length_and_band(table, byte_level_tokenizer):
    from analysis.pilots import split_columns

    the, cafe = (tok(byte_level_tokenizer, t) for t in (" the", " cafe"))
    cafe_first = [" cafe", " the", "hello", " x", "123"]
    rows = [(" the", CANDS, 0.1, 1.0, " the"), ("zzzz", CANDS, 0.1, 1.0, " the"), (" cafe", cafe_first, 0.1, 1.0, " the")]
    analysis = make(table, byte_level_tokenizer, rows)
    analysis.records.label_chars[1] = table.chars[cafe]
    counts = torch.zeros(table.vocab_size, dtype=torch.long)
    counts[the], counts[cafe] = 5000, 3
    columns = split_columns(analysis, counts)
    nan = float("nan")
    assert columns["raw/top1/length 3-4"].tolist() == pytest.approx([1, 0, nan], nan_ok=True)
    assert columns["label_is_top1/length 3-4"].tolist() == pytest.approx([1, 0, nan], nan_ok=True)
    assert columns["raw/top1/length 5"].tolist() == pytest.approx([nan, nan, 1], nan_ok=True)
    assert columns["raw/top1/band 1-9"].tolist() == pytest.approx([nan, nan, 1], nan_ok=True)
    assert columns["raw/top1/band 1000-9999"].tolist() == pytest.approx([1, 0, nan], nan_ok=True)
    assert "raw/top1/length 1" not in columns and not any("band" in key for key in split_columns(analysis, None))


def test_fallback_for_agreement_hands_over_the_least_sure_positions_first():
    """Against a brute force over every count of handed-over positions (the least sure first): the
    smallest share whose hand-over (counted right) leaves agreement >= the target."""
    from analysis.common import fallback_for_agreement

    g = torch.Generator().manual_seed(0)
    unsure = torch.rand(200, generator=g)
    right = torch.rand(200, generator=g) > unsure  # surer positions are right more often
    order = unsure.argsort(descending=True)
    for target in (0.5, 0.8, 0.95, 1.0):
        handed = next(n for n in range(201) if (right[order[n:]].sum() + n) / 200 >= target)
        assert fallback_for_agreement(unsure, right, target) == pytest.approx(handed / 200)
    assert fallback_for_agreement(unsure, torch.ones(200, dtype=torch.bool), 1.0) == 0.0
    assert fallback_for_agreement(unsure, torch.zeros(200, dtype=torch.bool), 0.9) == pytest.approx(0.9)
