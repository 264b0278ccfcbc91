"""The command line: every option declared once, recipe files, the spellm command, readable logs."""

import re
import subprocess
import sys
from dataclasses import fields

import pytest

from launch import distill, spellm
from spellm_ds.distill.config import RunConfig
from spellm_ds.errors import SpellmError
from tests import tiny
from tests.distributed import ROOT, free_port, rank_env
from tests.entry_points import run_module

DECLARED = [f.name for f in fields(RunConfig) if "help" in f.metadata]


def test_every_run_option_is_declared_once_and_in_help(capsys):
    assert DECLARED == [f.name for f in fields(RunConfig)]  # nothing undeclared
    with pytest.raises(SystemExit):
        distill.parse_args(["--help"])
    text = capsys.readouterr().out
    options = text[text.index("options:"):]
    for name in DECLARED:
        assert len(re.findall(rf"^\s+--{name}\b", options, flags=re.M)) == 1, name
    # the groups, essentials first and the levers last
    order = [options.index(group) for group in ("essentials:", "recipe:", "runtime and parallelism:",
                                                "experimental levers")]
    assert order == sorted(order)
    assert RunConfig(**{**vars(RunConfig()), }) == distill.parse_args([])  # the parser's defaults are the declaration's


def test_a_recipe_file_sets_options_and_flags_override_it(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("max_steps: 20500\nlr: 1.5e-3\nteacher_cache: true\ndata: [a.txt, b.txt]\nlabel_gate: null\n")
    config = distill.parse_args(["--config", str(recipe), "--max_steps", "7", "--no-teacher_cache"])
    assert (config.max_steps, config.lr, config.teacher_cache, config.data) == (7, 1.5e-3, False, ["a.txt", "b.txt"])
    assert distill.parse_args(["--config", str(ROOT / "configs" / "reference.yaml")]).train_blocks == 15000
    for text, message in (("nope: 1\n", "unknown option 'nope'"), ("max_steps: many\n", "max_steps is 'many'"),
                          ("teacher_cache: 1\n", "teacher_cache is 1"), ("- a list\n", "must map option names"),
                          ("max_steps: [\n", "not readable YAML")):
        recipe.write_text(text)
        with pytest.raises(SpellmError, match=re.escape(message)):
            distill.parse_args(["--config", str(recipe)])
    with pytest.raises(SpellmError, match="does not exist"):
        distill.parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_every_recipe_file_in_configs_reads():
    for recipe in sorted((ROOT / "configs").glob("*.yaml")):
        config = distill.parse_args(["--config", str(recipe)])
        config.validate()


@pytest.mark.parametrize("name", [*spellm.COMMANDS, *(f"bench {name}" for name in spellm.BENCHMARKS)])
def test_every_subcommand_answers_help(name, monkeypatch, capfd):
    result = run_module("spellm_ds", [*name.split(), "--help"], monkeypatch, capfd)
    assert result.returncode == 0, result.stderr[-2000:]
    # lm-eval is lm-evaluation-harness's own command line, with this package's model and tasks added
    assert result.stdout.startswith("usage: lm-eval" if name == "lm-eval" else f"usage: spellm {name}")


@pytest.mark.processes
def test_spellm_lists_its_subcommands_and_refuses_an_unknown_one():
    listing = subprocess.run([sys.executable, "-m", "spellm_ds"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert all(f"  {name} " in listing.stdout for name in [*spellm.COMMANDS, *spellm.BENCHMARKS])
    unknown = subprocess.run([sys.executable, "-m", "spellm_ds", "distil"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and unknown.stderr.strip() == "error: unknown subcommand 'distil'; see spellm --help"


@pytest.mark.processes
def test_a_quick_run_logs_a_header_its_evaluations_and_short_lines(tmp_path):
    model_dir, data = tiny.tiny_setup(tmp_path, 40)
    result = subprocess.run([sys.executable, "-m", "spellm_ds", "distill", "--config", "configs/quick.yaml",
                             "--model", str(model_dir), "--data", str(data), "--output_dir", str(tmp_path / "run"),
                             "--k", "6", "--seq_len", "32", "--max_steps", "30", "--eval_every", "10", "--warmup", "2"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env=rank_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_PORT=str(free_port())))
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    for start in ("model: ", "data: ", "plan: 30 steps of 2 blocks", "ranks: 1 x ", "output: "):
        assert any(line.startswith(start) for line in log.splitlines()), start
    assert [line.split(":")[0] for line in log.splitlines() if "held-out exact+prefix" in line] == [
        "step 10", "step 20", "step 30"]
    assert "step 30/30: training" in log and f"exported SpeLLM model: {tmp_path / 'run' / 'model'}" in log
    assert max(len(line) for line in log.splitlines()) < 300 and "\r" not in log
    assert "FutureWarning" not in log and "Setting accelerator" not in log
