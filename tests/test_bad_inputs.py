"""Every entry point refuses bad input the same way: exit 2, one ``error:`` line naming the flag or
path, no traceback, and no output written. Table-driven, real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests import tiny
from tests.distributed import ROOT, free_port, rank_env
from tests.test_data import one_line_error


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny base model, a tiny SpeLLM directory, a corpus and assorted broken files."""
    root = tmp_path_factory.mktemp("bad")
    base, corpus = tiny.tiny_setup(root, n_texts=40)
    spellm = tiny.spellm_dir(root / "spellm", base, k=6, trainable_layers=2)
    (root / "no_tokenizer").mkdir()
    (root / "no_tokenizer" / "config.json").write_text((base / "config.json").read_text())
    (root / "bad.json").write_text("{oops")
    (root / "list.json").write_text("[1, 2]")
    (root / "auto_lr.json").write_text(json.dumps({"optimizer": {"type": "SGD", "params": {"momentum": "auto"}}}))
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "binary_charset.txt").write_bytes(b"\xff\xfe\x00abc")
    (root / "a_file").write_text("not a directory")
    (root / "no_checkpoints").mkdir()
    return {"root": root, "base": base, "corpus": corpus, "spellm": spellm}


def distill(f, *flags):
    return ["launch/distill.py", "--model", str(f["base"]), "--data", str(f["corpus"]),
            "--output_dir", str(f["root"] / "out"), "--k", "6", "--trainable_layers", "2", *flags]


def spellm_cli(script, f, *flags):
    return [script, "--model", str(f["spellm"]), *flags]


def analysis(module, f, *flags):
    return ["-m", f"analysis.{module}", "--model", str(f["spellm"]), "--data", str(f["corpus"]), *flags]


R = "{root}"  # placeholder for the fixture's folder inside expected messages
CASES = [
    # launch/distill.py: every flag checked before any weights load
    (lambda f: distill(f, "--eval_every", "0"), "--eval_every 0"),
    (lambda f: distill(f, "--eval_blocks", "0"), "--eval_blocks 0"),
    (lambda f: distill(f, "--micro_batch", "0"), "--micro_batch 0"),
    (lambda f: distill(f, "--grad_accum", "0"), "--grad_accum 0"),
    (lambda f: distill(f, "--lr", "-0.001"), "--lr -0.001"),
    (lambda f: distill(f, "--warmup", "-1"), "--warmup -1"),
    (lambda f: distill(f, "--max_steps", "10", "--stop_at", "11"), "--stop_at 11"),
    (lambda f: distill(f, "--collective_timeout_s", "0"), "--collective_timeout_s 0"),
    (lambda f: distill(f, "--trainable_layers", "9"), "--trainable_layers 9"),
    (lambda f: distill(f, "--k", "0"), "--k 0"),
    (lambda f: distill(f, "--readout_width", "-1"), "--readout_width -1"),
    (lambda f: distill(f, "--seq_len", "1"), "--seq_len 1"),
    (lambda f: distill(f, "--eval_fraction", "1.5"), "--eval_fraction 1.5"),
    (lambda f: distill(f, "--keep_checkpoints", "0"), "--keep_checkpoints 0"),
    (lambda f: distill(f, "--save_every", "-1"), "--save_every -1"),
    (lambda f: distill(f, "--reg_weight", "-1"), "--reg_weight -1"),
    (lambda f: distill(f, "--reg_target", "kl"), "--reg_target"),
    (lambda f: distill(f, "--soft_char_weight", "-1"), "--soft_char_weight -1"),
    (lambda f: distill(f, "--soft_char_candidates", "4"), "--soft_char_candidates 4"),
    (lambda f: distill(f, "--train_blocks", "0"), "--train_blocks 0"),
    (lambda f: distill(f, "--spelling_kl_weight", "-1"), "--spelling_kl_weight -1"),
    (lambda f: distill(f, "--spelling_kl_fraction", "0"), "--spelling_kl_fraction 0"),
    (lambda f: distill(f, "--state_noise", "-0.1"), "--state_noise -0.1"),
    (lambda f: distill(f, "--state_noise", "0.2", "--trainable_layers", "1"), "--state_noise 0.2 needs the read-out"),
    (lambda f: distill(f, "--anchored_rows", "-1"), "--anchored_rows -1"),
    (lambda f: distill(f, "--anchored_rows", "1", "--no-shared_trunk"), "--anchored_rows 1 needs the read-out"),
    (lambda f: distill(f, "--rare_label_power", "-1"), "--rare_label_power -1"),
    (lambda f: distill(f, "--label_prior_weight", "-0.5"), "--label_prior_weight -0.5"),
    (lambda f: distill(f, "--ffn_lr", "0"), "--ffn_lr 0"),
    (lambda f: distill(f, "--ffn_lr", "1e-4", "--trainable_layers", "0"), "--trainable_layers > 0"),
    (lambda f: distill(f, "--max_steps", "0"), "--max_steps 0"),
    (lambda f: distill(f, "--teacher_cache_from", str(f["root"])), "needs --teacher_cache"),
    (lambda f: distill(f, "--teacher_cache", "--teacher_cache_from", str(f["root"] / "no_checkpoints")),
     f"{R}/no_checkpoints/teacher_cache holds no teacher cache"),
    (lambda f: distill(f, "--micro_batch", "two"), "--micro_batch"),
    (lambda f: distill(f, "--deepspeed", str(f["root"] / "bad.json")), f"{R}/bad.json"),
    (lambda f: distill(f, "--deepspeed", str(f["root"] / "list.json")), f"{R}/list.json"),
    (lambda f: distill(f, "--deepspeed", str(f["root"] / "missing.json")), f"{R}/missing.json"),
    (lambda f: distill(f, "--deepspeed", str(f["root"] / "auto_lr.json")), "optimizer.params.momentum"),
    (lambda f: distill(f, "--teacher_deepspeed", str(f["root"] / "bad.json")), f"{R}/bad.json"),
    (lambda f: distill(f, "--data", str(f["root"] / "missing.txt")), f"{R}/missing.txt"),
    (lambda f: distill(f, "--data", str(f["root"] / "binary.txt")), f"{R}/binary.txt"),
    (lambda f: distill(f, "--charset", str(f["root"] / "binary_charset.txt")), f"{R}/binary_charset.txt"),
    (lambda f: distill(f, "--charset", str(f["root"] / "missing_charset.txt")), f"{R}/missing_charset.txt"),
    (lambda f: [*distill(f), "--model", str(f["root"] / "no_tokenizer")], f"{R}/no_tokenizer"),
    (lambda f: [*distill(f), "--model", str(f["root"] / "missing_model")], f"{R}/missing_model"),
    # launch/generate.py
    (lambda f: spellm_cli("launch/generate.py", f, "--prompt", "x", "--top_p", "0"), "--top_p"),
    (lambda f: spellm_cli("launch/generate.py", f, "--prompt", "x", "--temperature", "0"), "--temperature"),
    (lambda f: spellm_cli("launch/generate.py", f, "--prompt", "x", "--max_new_tokens", "0"), "--max_new_tokens"),
    (lambda f: spellm_cli("launch/generate.py", f, "--prompt", "x", "--tau", "-1"), "--tau"),
    (lambda f: spellm_cli("launch/generate.py", f, "--prompt", "x", "--rerank_k", "-2"), "--rerank_k"),
    (lambda f: spellm_cli("launch/generate.py", f, "--prompt", "x", "--sample", "--rerank_k", "4"), "--rerank_k"),
    (lambda f: ["launch/generate.py", "--model", str(f["base"]), "--prompt", "x"], "not a SpeLLM model"),
    # launch/evaluate.py
    (lambda f: spellm_cli("launch/evaluate.py", f, "--batch_size", "0"), "--batch_size"),
    (lambda f: spellm_cli("launch/evaluate.py", f, "--limit", "0"), "--limit"),
    (lambda f: spellm_cli("launch/evaluate.py", f, "--out", str(f["root"] / "a_file")), f"{R}/a_file"),
    (lambda f: spellm_cli("launch/evaluate.py", f, "--tasks", "nowhere"), "--tasks nowhere"),
    # launch/export.py
    (lambda f: ["launch/export.py", "--checkpoint", str(f["root"] / "no_checkpoints"), "--out",
                str(f["root"] / "exported")], f"{R}/no_checkpoints"),
    (lambda f: ["launch/export.py", "--checkpoint", str(f["root"] / "no_checkpoints"), "--out",
                str(f["root"] / "a_file")], f"{R}/a_file"),
    # launch/calibrate.py
    (lambda f: spellm_cli("launch/calibrate.py", f, "--max_tokens", "0"), "--max_tokens"),
    (lambda f: ["launch/calibrate.py", "--model", str(f["base"])], "not a SpeLLM model"),
    (lambda f: spellm_cli("launch/calibrate.py", f, "--data", str(f["root"] / "missing.txt")), f"{R}/missing.txt"),
    # analysis modules
    (lambda f: analysis("report", f, "--batch_size", "0", "--out", str(f["root"] / "report")), "--batch_size"),
    (lambda f: analysis("report", f, "--max_tokens", "0", "--out", str(f["root"] / "report")), "--max_tokens"),
    (lambda f: analysis("report", f, "--tau", "high", "--out", str(f["root"] / "report")), "--tau"),
    (lambda f: analysis("report", f, "--out", str(f["root"] / "a_file")), f"{R}/a_file"),
    (lambda f: analysis("match_rates", f, "--out", str(f["root"] / "no_checkpoints")), f"{R}/no_checkpoints"),
    (lambda f: analysis("label_frequency", f, "--teacher_cache_dir", str(f["root"]), "--out", str(f["root"] / "lf.json")),
     "holds no training entries"),
    # benchmarks
    (lambda f: ["-m", "bench.decode_speed", "--repeats", "0"], "--repeats"),
    (lambda f: ["-m", "bench.decode_speed", "--model", str(f["root"]), "--repeats", "3"], "--repeats 3: at least 6"),
    (lambda f: ["-m", "bench.decode_speed"], "--model"),
    (lambda f: ["-m", "bench.distill_throughput", "--steps", "0"], "--steps"),
    # launch/spelling_report.py
    (lambda f: ["launch/spelling_report.py", "--model", str(f["base"]), "--k", "0"], "--k"),
]
OUTPUTS = ("out", "report", "exported", "lf.json")  # what a refused command must not have created


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = rank_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_PORT=str(free_port()))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(files):
    assert len(CASES) >= 30
    commands = [make(files) for make, _ in CASES]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, commands))
    for (_, expected), command, result in zip(CASES, commands, results):
        line = one_line_error(result)
        assert expected.replace(R, str(files["root"])) in line, (command, line)
    for name in OUTPUTS:
        assert not (files["root"] / name).exists(), name
    assert (files["root"] / "a_file").read_text() == "not a directory"
