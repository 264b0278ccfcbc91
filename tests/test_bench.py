"""Every benchmark runs in quick mode and writes its JSON; no timing is asserted."""

import json
import os
import subprocess
import sys

import pytest

from tests.distributed import ROOT, rank_env


def run_bench(name, tmp_path, *extra):
    out = tmp_path / f"{name}.json"
    result = subprocess.run([sys.executable, "-m", f"bench.{name}", "--quick", "--out", str(out), *extra],
                            capture_output=True,
                            text=True, timeout=600, cwd=ROOT, env=rank_env())
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(out.read_text())
    assert document["benchmark"] == f"{name}_quick" and document["hardware"]["cpu_count"] >= 1
    assert len(document["commit"].removesuffix("-dirty")) == 40
    return document


def positive(value):
    return isinstance(value, float) and value > 0


@pytest.mark.processes
def test_head_cost(tmp_path):
    document = run_bench("head_cost", tmp_path, "--dtypes", "fp32", "bf16")
    assert document["settings"]["readout_width"] == 2 * document["settings"]["hidden"]  # the library default
    assert document["settings"]["threads"] == document["hardware"]["torch_threads"] == os.cpu_count()
    results = document["results"]
    assert {(r["dtype"], r["batch"]) for r in results} == {(d, b) for d in ("float32", "bfloat16") for b in (1, 8, 64)}
    for row in results:
        assert set(row["seconds_per_position"]) == {"a_lm_head", "b_char_heads", "c_lookup", "d_autocorrect",
                                                    "e_entropy", "f_decode_path", "g_readout_decode_path",
                                                    "h_rerank"}
        assert all(positive(v) for v in row["seconds_per_position"].values())
        seconds = row["seconds_per_position"]
        assert row["speedup_vs_lm_head"] == pytest.approx({n: seconds["a_lm_head"] / s for n, s in seconds.items()})


@pytest.mark.processes
def test_decode_speed(tmp_path):
    document = run_bench("decode_speed", tmp_path, "--threads", "1", "--rerank_k", "4", "--shortlist", "30",
                         "--dtypes", "fp32", "bf16")
    assert document["settings"]["threads"] == document["hardware"]["torch_threads"] == 1
    assert document["settings"]["rerank_k"] == 4 and document["settings"]["shortlist"] == 30
    results = document["results"]
    assert {(r["dtype"], r["batch"]) for r in results} == {(d, b) for d in ("float32", "bfloat16") for b in (1, 8)}
    for row in results:
        assert set(row["tokens_per_s"]) == {"hf_generate", "loop_lm_head", "spellm", "spellm_fallback", "loop_no_head",
                                            "spellm_rerank", "spellm_hf_generate"}
        assert row["hf_generate_vs_loop"] == row["tokens_per_s"]["spellm_hf_generate"] / row["tokens_per_s"][
            "spellm_fallback"]
        assert all(positive(v) for v in row["tokens_per_s"].values())
        for name, interval in row["tokens_per_s_interval"].items():
            assert interval["low"] <= interval["median"] == row["tokens_per_s"][name] <= interval["high"]
        assert 0.0 <= row["fallback_rate"] <= 1.0 and 0.0 <= row["autocorrected_rate"] <= 1.0
        assert 0.0 <= row["rerank_fallback_rate"] <= 1.0 and 0.0 <= row["reranked_rate"] <= 1.0
        loops = {"loop_lm_head", "spellm", "spellm_fallback", "loop_no_head", "spellm_rerank"}
        assert set(row["head_ms_per_step"]) == set(row["share_of_head_time_saved"]) == loops
        assert all(positive(interval["median"]) for interval in row["head_ms_per_step"].values())
        saved = row["share_of_head_time_saved"]
        assert saved["loop_lm_head"]["median"] == 0.0 and saved["loop_no_head"]["median"] == 1.0
        assert row["share_of_no_head_gain"]["loop_no_head"]["median"] == 1.0


def test_median_interval_uses_the_order_statistics_of_the_binomial():
    from bench.common import median_interval

    # textbook 95% intervals for the median: n=10 -> x(2), x(9); n=20 -> x(6), x(15) (1-based)
    ten = median_interval([float(v) for v in reversed(range(10))])
    assert (ten["low"], ten["median"], ten["high"]) == (1.0, 4.5, 8.0) and ten["coverage"] == pytest.approx(1 - 22 / 1024)
    twenty = median_interval(list(range(20)))
    assert (twenty["low"], twenty["high"]) == (5, 14) and twenty["coverage"] >= 0.95
    five = median_interval([3, 1, 2, 5, 4])  # too few for 95%: the full range, with what it covers
    assert (five["low"], five["high"], five["coverage"]) == (1, 5, 1 - 2 / 32)


def test_decode_speed_refuses_a_head_faster_than_no_head():
    from bench.decode_speed import refuse_beating_the_bound
    from spellm_ds.errors import SpellmError

    bound = {"median": 100.0, "low": 98.0, "high": 102.0}
    refuse_beating_the_bound({"loop_no_head": bound, "spellm": {"median": 101.0, "low": 99.0, "high": 103.0}}, "x")
    with pytest.raises(SpellmError, match="spellm .* beats the no-head bound"):
        refuse_beating_the_bound({"loop_no_head": bound, "spellm": {"median": 105.0, "low": 103.0, "high": 107.0}},
                                 "fp32 batch 1")


def test_decode_speed_pairs_the_gain_share_by_round():
    from bench.decode_speed import paired_share

    # the machine twice as slow in round 2: each round alone says 90%, whatever the drift
    times = {"loop_lm_head": [10.0, 20.0, 10.0], "loop_no_head": [8.0, 16.0, 8.0], "spellm": [8.2, 16.4, 8.2]}
    shares = paired_share(times)
    assert shares["spellm"]["median"] == pytest.approx(0.9) and shares["spellm"]["low"] == pytest.approx(0.9)
    assert shares["loop_lm_head"]["median"] == 0.0 and shares["loop_no_head"]["median"] == 1.0
    speeds = {name: [1 / t for t in values] for name, values in times.items()}
    assert paired_share(speeds)["spellm"]["median"] == pytest.approx(0.9 * 8.0 / 8.2)  # in speed: x t5 / t3


@pytest.mark.processes
def test_distill_throughput(tmp_path):
    cores = os.cpu_count()
    names = sorted({f"bound_1x{cores}", f"bound_{cores}x1"})
    # one job variant: each launch costs half a minute here (--no-shared_trunk is tested in test_engines)
    document = run_bench("distill_throughput", tmp_path, "--variants", *names, "default")
    results = document["results"]
    bounds = [results[name] for name in names]
    assert all(positive(b["tokens_per_s"]) for b in bounds) and max(b["ratio_to_bound"] for b in bounds) == 1.0
    variant = results["default"]
    assert all(positive(variant[key]) for key in ("tokens_per_s", "teacher_s", "student_s", "backward_s"))
    assert variant["ratio_to_bound"] == variant["tokens_per_s"] / max(b["tokens_per_s"] for b in bounds)
    within_round = variant["tokens_per_s_by_round"][0] / max(b["tokens_per_s_by_round"][0] for b in bounds)
    assert variant["ratio_to_bound_within_round"] == {"median": within_round, "range": [within_round, within_round]}
    assert document["settings"]["variants"]["default"] == {"flags": [], "ranks": 2, "threads_per_rank": 1,
                                                           "persistence_threshold": "auto",
                                                           "memory_efficient_linear": None}


def test_benchmarks_time_bf16_only_where_it_is_fast(monkeypatch):
    import torch

    from bench.common import dtypes_to_time
    from spellm_ds.runtime import precision

    monkeypatch.setattr(precision, "choose", lambda device, requested="auto": precision.Precision(False, "emulated"))
    assert dtypes_to_time(None) == [torch.float32]
    monkeypatch.setattr(precision, "choose", lambda device, requested="auto": precision.Precision(True, "native"))
    assert dtypes_to_time(None) == [torch.float32, torch.bfloat16]
    assert dtypes_to_time(["bf16"]) == [torch.bfloat16]


@pytest.mark.processes
def test_operating_points(tmp_path):
    """Every tau's held-out fallback rate and agreement, and its speed against the LM-head loop: at tau
    0 every position falls back (the LM head decides: full agreement), with 'none' none does."""
    from tests import tiny

    base_dir = tiny.tiny_llama_dir(tmp_path / "base", tiny.corpus_texts(40))
    model = tiny.spellm_dir(tmp_path / "spellm", base_dir, std=0.3, k=6, trainable_layers=0)
    out = tmp_path / "points.json"
    result = subprocess.run([sys.executable, "-m", "bench.operating_points", "--model", str(model), "--taus", "0",
                             "1.5", "none", "--rerank_k", "3", "--shortlist", "20", "--max_tokens", "512",
                             "--batch", "2",
                             "--new_tokens", "4", "--repeats", "6", "--threads", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT, env=rank_env())
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]["rows"]
    decodings = [(0, 0), (3, 0), (0, 20), (3, 20)]
    assert [(row["tau"], row["rerank_k"], row["shortlist"]) for row in rows] == [
        (tau, *decoding) for decoding in decodings for tau in (0.0, 1.5, None)]
    everything, nothing = rows[0], rows[2]
    assert everything["fallback_rate"]["rate"] == 1.0 and everything["agreement"]["rate"] == 1.0
    assert everything["generated_fallback_rate"] == 1.0
    assert nothing["fallback_rate"]["rate"] == 0.0 and nothing["generated_fallback_rate"] == 0.0
    assert nothing["agreement"]["rate"] < 1.0  # untrained heads
    # the LM head's choice among more candidates agrees more often where the heads decide everything
    never = {(row["rerank_k"], row["shortlist"]): row["agreement"]["rate"] for row in rows if row["tau"] is None}
    assert never[0, 0] < never[3, 0] < never[3, 20] and never[0, 0] < never[0, 20]
    assert all(positive(row["speed_vs_lm_head"]["median"]) for row in rows)
    best = json.loads(out.read_text())["results"]["fastest_at_target"]  # which one is a matter of timing
    reaching = [row for row in rows if row["agreement"]["rate"] >= 0.95]
    assert everything in reaching and best == max(reaching, key=lambda row: row["speed_vs_lm_head"]["median"])
    assert (f"fastest at >= 95% agreement: tau {best['tau']}, rerank_k {best['rerank_k']}, shortlist "
            f"{best['shortlist']}:") in result.stdout


@pytest.mark.processes
def test_scale_shows_zero3_partitioning(tmp_path):
    """The offload config (the plain one runs in every other distillation test), 2 ranks."""
    document = run_bench("scale", tmp_path, "--configs", "zero3_offload")
    assert document["settings"]["ranks"] == 2 and document["settings"]["parameters"] > 0
    assert set(document["results"]) == {"zero3_offload"}
    for result in document["results"].values():
        assert result["exported"] and len(result["step_s"]) == 2
        assert len(result["ranks"]) == 2
        for rank in result["ranks"]:
            # every parameter partitioned over 2 ranks: each holds half, plus the padding of odd sizes
            assert 0.5 <= rank["teacher_held_share"] < 0.52 and 0.5 <= rank["student_held_share"] < 0.52
            assert rank["peak_rss_gb"] > 0
