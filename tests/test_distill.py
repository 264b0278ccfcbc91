"""A real 2-rank ZeRO-3 distillation (torchrun, gloo) of a tiny Llama on real text."""

import math
import statistics

import pytest
import torch
from safetensors.torch import load_file

from spellm_ds.model.spellm import load
from tests import tiny
from tests.distributed import ROOT, scalars, torchrun

STEPS, K = 30, 6
TRAIN_BLOCKS = 160  # 2 ranks x 4 blocks a step: the first pass ends at step 20, two evaluations before the last


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    texts = tiny.corpus_texts(300)
    model_dir = tiny.tiny_llama_dir(root / "base", texts)
    data = root / "corpus.jsonl"
    import json
    data.write_text("\n".join(json.dumps({"body": t}) for t in texts))
    out = root / "out"
    result = torchrun(["--model", str(model_dir), "--data", str(data), "--text_field", "body",
                       "--output_dir", str(out), "--k", str(K), "--trainable_layers", "2", "--seq_len", "64",
                       "--micro_batch", "4", "--lr", "3e-3", "--warmup", "3", "--max_steps", str(STEPS),
                       "--eval_every", "5", "--save_every", "0", "--eval_blocks", "16",
                       "--train_blocks", str(TRAIN_BLOCKS)])
    assert result.returncode == 0, result.stderr[-4000:]
    return model_dir, out, result


@pytest.mark.processes
def test_logs_every_documented_tag(run):
    _, out, result = run
    tags = scalars(out / "tensorboard")
    expected = {"loss/total", "loss/char", "loss/token", "match/exact", "match/prefix", "match/at5",
                "entropy/student", "entropy/teacher", "perf/tokens_per_s", "perf/teacher_s", "perf/student_s",
                "lr", "lr/ffn", "mem/rss_gb", "eval/match/exact", "eval/match/prefix", "eval/match/at5"}
    expected |= {f"acc/head_{j}" for j in range(1, K + 1)}
    assert expected <= set(tags)
    assert [s for s, _ in tags["loss/total"]] == list(range(1, STEPS + 1))
    assert "trainable parameters:" in result.stdout
    assert (out / "run_config.json").is_file()


@pytest.mark.processes
def test_loss_falls_and_held_out_match_rises(run):
    _, out, _ = run
    tags = scalars(out / "tensorboard")
    loss = [v for _, v in tags["loss/total"]]
    assert statistics.mean(loss[-5:]) < 0.8 * statistics.mean(loss[:5])
    held_out = dict(tags["eval/match/exact_or_prefix"])
    assert held_out[STEPS] > held_out[0] + 0.05


@pytest.mark.processes
def test_only_heads_and_last_ffns_changed(run):
    model_dir, out, _ = run
    base = load_file(model_dir / "model.safetensors")
    exported = load_file(out / "model" / "model.safetensors")
    assert {f"base.{name}" for name in base} == {name for name in exported if name.startswith("base.")}
    changed = {name for name in base if not torch.equal(base[name], exported[f"base.{name}"])}
    trainable = {n for n in base if ".mlp." in n and (".layers.2." in n or ".layers.3." in n)}
    assert changed == trainable  # every trainable FFN moved; embeddings, attention, norms, lower layers did not
    model = load(out / "model")
    assert model.config.k == K and model.config.teacher == str(model_dir)


@pytest.mark.processes
def test_training_curves_plot_and_summary(run, tmp_path):
    import json
    import subprocess
    import sys

    from tests.distributed import ROOT, rank_env

    _, out, _ = run
    png = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, "-m", "analysis.training_curves", "--logdir", str(out / "tensorboard"),
                             "--out", str(png)], capture_output=True, text=True, timeout=120, cwd=ROOT, env=rank_env())
    assert result.returncode == 0, result.stderr
    summary = json.loads(png.with_suffix(".json").read_text())
    held_out = dict(scalars(out / "tensorboard")["eval/match/exact_or_prefix"])
    assert summary["steps"] == STEPS and summary["held_out_exact_or_prefix"]["0"] == held_out[0]
    assert png.stat().st_size > 10000
    # match against log2(tokens): 2 ranks x 4 blocks x 64 tokens per step, a line through the
    # evaluations of the first pass over the training blocks (steps 5-20), not the later ones
    assert summary["tokens_per_step"] == 2 * 4 * 64
    assert json.loads((out / "run_config.json").read_text())["packed_train_blocks"] == TRAIN_BLOCKS
    assert summary["first_pass_steps"] == 20
    fit = summary["held_out_vs_log2_tokens"]
    assert fit["points"] == 4 and fit["last_step"] == 20
    slope = statistics.linear_regression([math.log2(step * 512) for step in (5, 10, 15, 20)],
                                         [held_out[step] for step in (5, 10, 15, 20)]).slope
    assert fit["per_doubling"] == pytest.approx(slope, rel=1e-9)


def test_log_token_fit_finds_the_tokens_of_a_level_on_an_exact_line():
    from analysis.training_curves import log_token_fit

    held_out = [(0, 0.0)] + [(step, 0.1 + 0.05 * math.log2(step * 1000)) for step in (100, 200, 400, 800)]
    fit = log_token_fit(held_out, 1000)
    assert fit["points"] == 4 and fit["per_doubling"] == pytest.approx(0.05)
    assert fit["tokens_to_reach"]["0.80"] == pytest.approx(2 ** 14) and fit["tokens_to_reach"]["0.95"] == pytest.approx(2 ** 17)
    assert log_token_fit([(100, 0.5), (200, 0.4), (400, 0.3)], 1000)["tokens_to_reach"]["0.80"] is None
    # evaluations after the first pass (here step 1600, off the line) are left out of the fit
    cut = log_token_fit(held_out + [(1600, 0.9)], 1000, last_step=800)
    assert cut["points"] == 4 and cut["last_step"] == 800 and cut["per_doubling"] == pytest.approx(0.05)
    assert log_token_fit(held_out + [(1600, 0.9)], 1000)["per_doubling"] != pytest.approx(0.05)
    # --fit_from: evaluations before the step (here 100, off the line) are left out, later passes kept
    late = log_token_fit([(0, 0.0), (100, 0.9)] + held_out[2:] + [(1600, 0.1 + 0.05 * math.log2(1600 * 1000))], 1000,
                         first_step=200)
    assert (late["points"], late["first_step"], late["last_step"]) == (4, 200, 1600)
    assert late["per_doubling"] == pytest.approx(0.05)


def test_summary_fits_the_first_pass_or_from_a_step():
    from analysis.training_curves import summary

    line = [(step, 0.1 + 0.05 * math.log2(step * 1000)) for step in (100, 200, 400, 800)]
    scalars = {"loss/total": [(s, 1.0) for s in range(1, 801)],
               "eval/match/exact_or_prefix": [(0, 0.0), (50, 0.9), *line, (1600, 0.2)]}
    first_pass = summary(scalars, 1000, first_pass_steps=800)["held_out_vs_log2_tokens"]
    assert (first_pass["first_step"], first_pass["last_step"], first_pass["points"]) == (50, 800, 5)
    from_step = summary(scalars, 1000, first_pass_steps=10, fit_from=100)
    fit = from_step["held_out_vs_log2_tokens"]
    assert (from_step["fit_from"], fit["first_step"], fit["last_step"], fit["points"]) == (100, 100, 1600, 5)
    assert summary(scalars, 1000, first_pass_steps=800, fit_from=100)["held_out_vs_log2_tokens"]["last_step"] == 1600
    assert summary(scalars, None, None)["held_out_vs_log2_tokens"] is None


def test_run_shape_reads_tokens_per_step_and_the_first_pass(tmp_path):
    import json

    from analysis.training_curves import run_shape

    (tmp_path / "tensorboard").mkdir()
    config = {"run": {"seq_len": 64, "micro_batch": 4, "grad_accum": 2, "train_blocks": None}, "world_size": 2}
    assert run_shape(tmp_path / "tensorboard") == (None, None)  # no run_config.json
    for packed, flag, first_pass in ((None, None, None), (None, 40, 3), (33, 40, 3), (32, None, 2)):
        extra = {} if packed is None else {"packed_train_blocks": packed}  # runs before the packed count: the flag
        (tmp_path / "run_config.json").write_text(json.dumps({**config, **extra,
                                                              "run": {**config["run"], "train_blocks": flag}}))
        assert run_shape(tmp_path / "tensorboard") == (1024, first_pass)


@pytest.mark.processes
def test_two_ranks_equal_one_rank_on_the_same_global_batch(tmp_path):
    """2 ranks x 2 blocks and 1 rank x 4 blocks read the same blocks each step (fp32 ZeRO-3, the
    default recipe, whose ranks count different numbers of characters after END): the same losses
    and held-out metrics, up to float summation order."""
    import json

    model_dir, data = tiny.tiny_setup(tmp_path, n_texts=120)
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["bf16"] = {"enabled": False}
    (tmp_path / "fp32.json").write_text(json.dumps(ds))
    common = ["--model", str(model_dir), "--data", str(data), "--deepspeed", str(tmp_path / "fp32.json"), "--k", "6",
              "--trainable_layers", "2", "--seq_len", "32", "--lr", "3e-3", "--warmup", "1", "--max_steps", "4",
              "--eval_every", "2", "--eval_blocks", "8", "--save_every", "0"]
    runs = {}
    for ranks, micro_batch in ((2, 2), (1, 4)):
        out = tmp_path / f"ranks{ranks}"
        result = torchrun([*common, "--output_dir", str(out), "--micro_batch", str(micro_batch)], nproc=ranks)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[ranks] = scalars(out / "tensorboard")
    for tag in ("loss/total", "loss/char", "loss/token", "eval/match/exact_or_prefix", "eval/entropy/student"):
        two, one = runs[2][tag], runs[1][tag]
        assert [s for s, _ in two] == [s for s, _ in one] and len(two) >= 3, tag
        assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-4, abs=1e-5), tag
