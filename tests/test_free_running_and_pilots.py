"""The free-running metric and the pilot harness, on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from analysis import free_running, pilots
from analysis.common import paired_difference, rate
from spellm_ds.distill.metrics import wilson_interval
from spellm_ds.errors import SpellmError
from spellm_ds.model.decoding import generate
from spellm_ds.model.spellm import untrained
from tests import tiny
from tests.distributed import ROOT, rank_env


def test_agreed_tokens_count_the_shared_prefix():
    reference = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    candidate = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [7, 2, 3, 4]])
    assert free_running.agreed_tokens(reference, candidate).tolist() == [4, 1, 0]
    result = free_running.agreement(reference, candidate)
    assert result["identical"] == pytest.approx(1 / 3) and result["mean_agreed_tokens"] == pytest.approx(5 / 3)
    half = 1.96 * torch.tensor([4.0, 1.0, 0.0]).std().item() / 3 ** 0.5
    assert result["mean_agreed_ci95"] == pytest.approx([5 / 3 - half, 5 / 3 + half])


@pytest.fixture(scope="module")
def student_and_teacher(tmp_path_factory):
    base_dir = tiny.tiny_llama_dir(tmp_path_factory.mktemp("free") / "base", tiny.corpus_texts(60))
    teacher = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    student = untrained(base_dir, k=6)
    torch.manual_seed(0)
    torch.nn.init.normal_(student.char_heads.proj.weight, std=0.3)
    return student.eval(), teacher


def test_a_student_that_always_falls_back_to_the_teachers_head_agrees_everywhere(student_and_teacher):
    student, teacher = student_and_teacher
    prompt_ids = free_running.prompts(student.tokenizer, tiny.corpus_texts(200)[150:], 6, 12)
    assert prompt_ids.shape == (6, 12)
    result = free_running.compute(student, teacher, prompt_ids, 10, tau=0.0)  # every token falls back
    assert result["autocorrect_fallback"]["identical"] == 1.0
    assert result["autocorrect_fallback"]["agreed_tokens"] == [10] * 6
    assert result["autocorrect_fallback"]["provenance"]["fallback"] > 0
    # random char heads: the raw continuation leaves the teacher's at once
    expected = free_running.agreed_tokens(
        free_running.decode_loop(teacher, free_running.lm_head_picker(teacher), prompt_ids, None, 10,
                                 student.tokenizer.eos_token_id).sequences,
        generate(student, prompt_ids, max_new_tokens=10, tau=None).sequences)
    assert result["raw"]["agreed_tokens"] == expected.tolist()
    assert result["raw"]["mean_agreed_tokens"] < 10


def test_too_few_prompts_is_a_clear_error(student_and_teacher):
    with pytest.raises(SpellmError, match="lower --prompts"):
        free_running.prompts(student_and_teacher[0].tokenizer, ["one two"], 2, 50)


def test_paired_difference_and_pilot_names():
    a, b = torch.tensor([1, 1, 0, 1]), torch.tensor([0, 1, 0, 0])
    result = paired_difference(a, b)
    half = 1.96 * torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item() / 2
    assert result["diff"] == 0.5 and result["ci95"] == pytest.approx([0.5 - half, 0.5 + half]) and result["n"] == 4
    nan = float("nan")  # positions not scored in either column are left out
    values = paired_difference(torch.tensor([2.0, nan, 5.0, 1.0]), torch.tensor([1.0, 3.0, nan, 0.0]))
    assert values["diff"] == 1.0 and values["ci95"] == [1.0, 1.0] and values["n"] == 2
    assert paired_difference(a, b, torch.arange(4))["ci95"] == pytest.approx(result["ci95"])  # 1 per cluster
    assert pilots.parse_pilot('kl=--reg_target teacher --reg_weight "1.0"') == (
        "kl", ["--reg_target", "teacher", "--reg_weight", "1.0"])
    assert pilots.parse_pilot("baseline=") == ("baseline", [])
    with pytest.raises(SpellmError, match="NAME=FLAGS"):
        pilots.parse_pilot("--ignore_after_end")


def test_clustered_paired_difference_widens_the_interval_by_the_clusters_spread():
    """Two blocks of two positions whose differences agree within a block: the interval counts two
    independent units, not four; positions not scored leave their clusters."""
    values, baseline = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.zeros(4)
    plain = paired_difference(values, baseline)
    clustered = paired_difference(values, baseline, torch.tensor([0, 0, 1, 1]))
    assert plain["diff"] == clustered["diff"] == 0.5 and clustered["clusters"] == 2 and clustered["n"] == 4
    # cluster sums of d - mean: +1 and -1; se = sqrt(2 / (2 - 1) * 2) / 4 = 0.5
    assert clustered["ci95"] == pytest.approx([0.5 - 1.96 * 0.5, 0.5 + 1.96 * 0.5])
    assert plain["ci95"] == pytest.approx([0.5 - 1.96 * (1 / 3) ** 0.5 / 2, 0.5 + 1.96 * (1 / 3) ** 0.5 / 2])
    nan = float("nan")
    partly = paired_difference(torch.tensor([1.0, nan, 0.0, 1.0, 3.0]), torch.zeros(5), torch.tensor([0, 1, 1, 2, 2]))
    assert partly["n"] == 4 and partly["clusters"] == 3 and partly["diff"] == 1.25
    sums = torch.tensor([1 - 1.25, 0 - 1.25, (1 - 1.25) + (3 - 1.25)], dtype=torch.float64)
    half = 1.96 * (3 / 2 * float((sums ** 2).sum())) ** 0.5 / 4
    assert partly["ci95"] == pytest.approx([1.25 - half, 1.25 + half])


def test_clustered_rate_is_the_wilson_interval_at_the_effective_sample_size():
    """Six flags in three blocks of two: the Wilson interval at n / deff, the design effect being
    the cluster-robust variance of the mean over the plain one; one position per block, or a rate
    of 1, leaves the plain Wilson interval."""
    flags = torch.tensor([True, True, False, False, True, False])
    clustered = rate(flags, torch.tensor([0, 0, 1, 1, 2, 2]))
    # p = 0.5; cluster sums of flag - p: +1, -1, 0; clustered variance 3 / 2 * 2 / 36 = 1 / 12;
    # plain variance p (1 - p) / (n - 1) = 0.05; effective n = 6 * 0.05 * 12 = 3.6
    assert clustered["rate"] == 0.5 and clustered["n"] == 6 and clustered["clusters"] == 3
    assert clustered["effective_n"] == pytest.approx(3.6)
    assert clustered["ci95"] == pytest.approx(list(wilson_interval(1.8, 3.6)))
    plain = rate(flags)
    assert plain["ci95"] == pytest.approx(list(wilson_interval(3, 6)))
    assert clustered["ci95"][1] - clustered["ci95"][0] > plain["ci95"][1] - plain["ci95"][0]
    assert rate(flags, torch.arange(6))["ci95"] == pytest.approx(plain["ci95"])
    assert rate(torch.ones(4, dtype=torch.bool), torch.tensor([0, 0, 1, 1]))["ci95"] == \
        pytest.approx(list(wilson_interval(4, 4)))


def test_pilot_speed_counts_wall_clock_between_the_first_and_last_step(tmp_path):
    """A run of cheap and dear steps (as with a teacher cache): tokens per hour come from the wall
    clock of its logged steps, not from its median step."""
    from torch.utils.tensorboard import SummaryWriter

    config = {"run": {"seq_len": 64, "micro_batch": 2, "grad_accum": 1}, "world_size": 2}  # 256 tokens a step
    (tmp_path / "run_config.json").write_text(json.dumps(config))
    writer = SummaryWriter(str(tmp_path / "tensorboard"))
    logged = [(100.0, 10.0), (110.0, 10.0), (111.0, 900.0), (112.0, 900.0), (136.0, 10.0)]  # (wall, tokens/s)
    for step, (wall, tokens_per_s) in enumerate(logged, start=1):
        writer.add_scalar("loss/total", 1.0, step, walltime=wall)
        writer.add_scalar("perf/tokens_per_s", tokens_per_s, step, walltime=wall)
    writer.close()
    speed = pilots.speed(tmp_path)
    assert speed["steps"] == 5 and speed["tokens_per_s"] == 10.0  # the median step
    assert speed["tokens_per_hour"] == pytest.approx(4 * 256 / (36 / 3600))  # 4 steps in 36 s


@pytest.mark.processes
def test_pilots_run_score_and_resume(tmp_path):
    """Two 3-step pilots on a tiny model: both trained and scored on the same positions; a rerun
    trains nothing and scores the same."""
    model_dir, data = tiny.tiny_setup(tmp_path, 150)
    common = f"--model {model_dir} --data {data} --k 6 --trainable_layers 2 --seq_len 64 --warmup 1"
    command = [sys.executable, "-m", "analysis.pilots", "--out", str(tmp_path / "pilots"), "--steps", "3",
               "--data", str(data), "--max_tokens", "512", "--prompts", "4", "--new_tokens", "8",
               "--pilot", f"base={common} --teacher_cache",
               "--pilot", f"end={common} --ignore_after_end --reg_target teacher"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=rank_env())
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tmp_path / "pilots" / "pilots.json").read_text())
    base, end = results["pilots"]["base"], results["pilots"]["end"]
    assert "vs_baseline" not in base and set(end["vs_baseline"]) == set(end["rates"])
    for key, diff in end["vs_baseline"].items():
        assert diff["diff"] == pytest.approx(end["rates"][key] - base["rates"][key])
    assert {"likelihood/nll", "likelihood/nll_matched"} <= set(end["rates"])
    assert end["likelihood"]["matched"]["target"] == pilots.MATCHED_RATE
    assert base["likelihood"]["teacher_nll"] == end["likelihood"]["teacher_nll"]
    assert end["likelihood"]["spellm"]["nll"] == pytest.approx(end["rates"]["likelihood/nll"], rel=1e-6)
    free = end["free_running"]["autocorrect_fallback"]
    assert end["rates"]["free_running/agreed_tokens"] == pytest.approx(free["mean_agreed_tokens"])
    assert end["vs_baseline"]["free_running/agreed_tokens"]["clusters"] == 4  # paired by prompt
    # per-position columns are clustered by their 256-token block: 512 positions, 2 blocks
    assert end["vs_baseline"]["raw/top1"]["clusters"] == end["vs_baseline"]["likelihood/nll"]["clusters"] == 2
    # split by the top-1's length and by its band of training counts (from the baseline's teacher cache):
    # each group's rates over its own positions, the groups' shares summing to the spellable positions
    by_length = {k: v for k, v in base["shares"].items() if k.startswith("length ")}
    by_band = {k: v for k, v in base["shares"].items() if k.startswith("band ")}
    assert by_length and by_band and sum(by_length.values()) == pytest.approx(sum(by_band.values()))
    assert all(f"label_is_top1/{group}" in end["vs_baseline"] for group in by_length)
    config = json.loads((tmp_path / "pilots" / "end" / "model" / "config.json").read_text())
    assert config["ignore_after_end"] is True
    run = json.loads((tmp_path / "pilots" / "end" / "run_config.json").read_text())["run"]
    assert run["max_steps"] == 3 and run["reg_target"] == "teacher"
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=rank_env())
    assert again.returncode == 0 and "pilot base :" not in again.stdout  # nothing retrained
    assert json.loads((tmp_path / "pilots" / "pilots.json").read_text())["pilots"]["end"]["rates"] == end["rates"]
    assert base["steps"] == 3 and base["tokens_per_hour"] > 0
