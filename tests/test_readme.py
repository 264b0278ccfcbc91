"""The README's commands run as written: every fenced command line parses with the options it shows
(against a model that is not there, so nothing runs), and its Python example runs on a tiny export."""

from __future__ import annotations

import re
import shlex

import pytest

from launch import distill
from tests import tiny
from tests.distributed import ROOT
from tests.entry_points import run_module

README = (ROOT / "README.md").read_text()
LAUNCHED_DISTILL = ("launch/distill.py", "launch/slurm/distill.sbatch")


def fenced(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.M | re.S)


def command_lines() -> list[list[str]]:
    """Each fenced bash command as words: continuations joined, comments dropped, optional
    ``[--flag value]`` kept as given, ``...`` (the user's other options) dropped."""
    lines = []
    for block in fenced("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = [word.strip("[]") for word in shlex.split(line, comments=True) if word != "..."]
            if words:
                lines.append(words)
    return lines


def without_environment(words: list[str]) -> list[str]:
    while "=" in words[0] and not words[0].startswith("-"):
        words = words[1:]
    return words


def distill_options(words: list[str]) -> list[str] | None:
    """The options a launcher line passes to the distillation, or None if it launches something else."""
    for marker in LAUNCHED_DISTILL:
        if marker in words:
            return words[words.index(marker) + 1:]
    if words[:1] == ["torchrun"] and "-m" in words:
        start = words.index("-m")
        assert words[start + 1: start + 3] == ["spellm_ds", "distill"], words
        return words[start + 3:]
    return None


def test_the_readme_shows_each_kind_of_command():
    programs = {without_environment(words)[0] for words in command_lines()}
    assert {"make", "deepspeed", "torchrun", "sbatch", "spellm"} <= programs
    assert len(fenced("python")) == 1


@pytest.mark.parametrize("words", command_lines(), ids=lambda words: " ".join(words)[:60])
def test_a_readme_command_parses_as_written(words, monkeypatch, capfd, tmp_path):
    words = without_environment(words)
    program, rest = words[0], words[1:]
    if program == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert rest[0] in targets, rest
        return
    options = distill_options(words)
    if options is not None:
        config = distill.parse_args(options)  # a recipe file read, every flag known and typed
        config.validate()
        if "--deepspeed" in words:
            assert (ROOT / words[words.index("--deepspeed") + 1]).is_file()
        return
    assert program == "spellm", words
    result = run_module("spellm_ds", rest, monkeypatch, capfd, cwd=tmp_path)
    # every option was accepted (argparse would print its usage); what stops it is the example's
    # model or checkpoint, which is not there
    assert "usage:" not in result.stderr and result.returncode == 2, result.stderr[-2000:]
    assert re.search(r"^error: .*runs/my-spellm", result.stderr, flags=re.M), result.stderr[-2000:]


def test_the_python_example_generates_with_a_converted_model(tmp_path, capsys):
    base, _ = tiny.tiny_setup(tmp_path, n_texts=40, family="qwen2")
    exported = tiny.spellm_dir(tmp_path / "spellm", base, k=6, trainable_layers=2)
    (example,) = fenced("python")
    assert example.count("runs/my-spellm/model") == 2
    exec(example.replace("runs/my-spellm/model", str(exported)), {})
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("The capital of France is") and len(printed) > len("The capital of France is")
