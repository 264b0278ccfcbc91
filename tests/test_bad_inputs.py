"""Every entry point refuses bad input the same way: exit 2, one ``error:`` line naming the flag or
path, no traceback, and no output written. Table-driven: each case runs its command's module as
``__main__`` in this process (as ``spellm SUBCOMMAND`` does), a few as real subprocesses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import tiny
from tests.distributed import ROOT, free_port, rank_env
from tests.entry_points import run_script
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
    return {"root": root, "base": base, "corpus": corpus, "spellm": spellm,
            **broken_models(root, spellm, base)}


def broken_models(root: Path, spellm: Path, base: Path) -> dict[str, Path]:
    """Copies of the SpeLLM (``m_*``) and base (``b_*``) directories, each with one defect."""
    weights = load_file(spellm / "model.safetensors")
    config = json.loads((spellm / "config.json").read_text())
    defects = {
        "m_bad_config": lambda d: (d / "config.json").write_text("{oops"),
        "m_k_type": lambda d: (d / "config.json").write_text(json.dumps({**config, "k": "ten"})),
        "m_charset_type": lambda d: (d / "config.json").write_text(json.dumps({**config, "charset": 5})),
        "m_tau_inf": lambda d: (d / "config.json").write_text(json.dumps({**config, "tau": float("inf")})),
        "m_no_weights": lambda d: (d / "model.safetensors").unlink(),
        "m_truncated": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
        "m_head_shape": lambda d: save_file({**weights, "char_heads.proj.weight": weights["char_heads.proj.weight"][:-3]
                                             .contiguous()}, d / "model.safetensors"),
        "m_no_heads": lambda d: save_file({n: t for n, t in weights.items() if not n.startswith("char_heads")},
                                          d / "model.safetensors"),
        "m_nan_heads": lambda d: save_file({**weights, "char_heads.proj.weight": torch.full_like(
            weights["char_heads.proj.weight"], float("nan"))}, d / "model.safetensors"),
        "m_no_tokenizer": lambda d: (d / "tokenizer.json").unlink(),
        "b_no_weights": lambda d: [p.unlink() for p in d.glob("*.safetensors")],
        "b_bad_config": lambda d: (d / "config.json").write_text("[1, 2"),
        "b_truncated": lambda d: [p.write_bytes(p.read_bytes()[:100]) for p in d.glob("*.safetensors")],
    }
    copies = {}
    for name, damage in defects.items():
        copies[name] = shutil.copytree(spellm if name.startswith("m_") else base, root / name)
        damage(copies[name])
    return copies


def distill(f, *flags):
    return ["launch/distill.py", "--model", str(f["base"]), "--data", str(f["corpus"]),
            "--output_dir", str(f["root"] / "out"), "--k", "6", "--trainable_layers", "2", *flags]


def spellm_cli(script, f, *flags):
    return [script, "--model", str(f["spellm"]), *flags]


def analysis(module, f, *flags):
    return ["-m", f"analysis.{module}", "--model", str(f["spellm"]), "--data", str(f["corpus"]), *flags]


R = "{root}"  # placeholder for the fixture's folder inside expected messages
MODEL_DEFECTS = {  # each broken copy of the SpeLLM directory and the end of the path its error names
    "m_bad_config": "/config.json is not readable JSON",
    "m_k_type": "/config.json is not a valid SpeLLM config (k 'ten'",
    "m_charset_type": "/config.json is not a valid SpeLLM config (charset",
    "m_tau_inf": "/config.json is not a valid SpeLLM config (tau inf",
    "m_no_weights": " has no weights",
    "m_truncated": "/model.safetensors is not a readable safetensors file",
    "m_head_shape": " do not fit the model (1 wrong tensors: char_heads.proj.weight",
    "m_no_heads": " do not fit the model (2 wrong tensors: char_heads.proj.bias missing",
    "m_nan_heads": " hold non-finite values (char_heads.proj.weight)",
    "m_no_tokenizer": " does not load",
}
MODEL_COMMANDS = [  # every kind of command that loads an exported model
    lambda f, name: ["launch/generate.py", "--model", str(f[name]), "--prompt", "x"],
    lambda f, name: ["launch/calibrate.py", "--model", str(f[name]), "--data", str(f["corpus"])],
    lambda f, name: ["-m", "analysis.report", "--model", str(f[name]), "--data", str(f["corpus"]),
                     "--out", str(f["root"] / "report")],
    lambda f, name: ["-m", "bench.operating_points", "--model", str(f[name]), "--out", str(f["root"] / "op.json")],
]
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
    (lambda f: distill(f, "--copy_lists", "1"), "--copy_lists 1.0 must be in [0, 1)"),
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
    (lambda f: distill(f, "--head_lr", "0"), "--head_lr 0.0 must be positive"),
    (lambda f: distill(f, "--head_lr", "1e-4", "--readout_width", "0"), "--head_lr 0.0001 needs a read-out"),
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
    (lambda f: ["launch/spelling_report.py", "--model", str(f["b_bad_config"])], f"{R}/b_bad_config"),
    # --out paths refused before any work; flags that take numbers refuse inf and nan
    *[(lambda f, args=args: [*args, "--out", str(f["root"] / "a_file" / "out.json")], f"{R}/a_file, which is a file")
      for args in (["-m", "bench.head_cost", "--quick"], ["-m", "bench.decode_speed", "--quick"],
                   ["-m", "bench.distill_throughput"], ["-m", "analysis.training_curves", "--logdir", "x"],
                   ["-m", "bench.operating_points", "--model", "x"], ["-m", "analysis.entropy", "--model", "x"],
                   ["-m", "analysis.free_running", "--model", "x"])],
    (lambda f: ["-m", "analysis.match_rates", "--model", "x", "--out", str(f["root"])], "is a directory"),
    (lambda f: distill(f, "--lr", "inf"), "--lr inf"),
    (lambda f: distill(f, "--state_noise", "nan"), "--state_noise nan"),
    (lambda f: distill(f, "--output_dir", str(f["root"] / "a_file")), f"{R}/a_file is a file"),
    (lambda f: distill(f, "--output_dir", str(f["root"] / "a_file" / "run")), f"{R}/a_file, which is a file"),
    (lambda f: spellm_cli("launch/generate.py", f, "--prompt", "x", "--temperature", "inf"), "--temperature"),
    (lambda f: spellm_cli("launch/generate.py", f, "--prompt", "x", "--tau", "inf"), "--tau"),
    (lambda f: spellm_cli("launch/generate.py", f, "--prompt", ""), "--prompt '' has no tokens"),
    (lambda f: spellm_cli("launch/generate.py", f, "--prompt", "x", "--device", "tpu"), "--device"),
    (lambda f: analysis("entropy", f, "--target_accuracy", "1.5", "--out", str(f["root"] / "e.json")),
     "--target_accuracy"),
    (lambda f: analysis("entropy", f, "--max_fallback_rate", "-0.1", "--out", str(f["root"] / "e.json")),
     "--max_fallback_rate"),
    # a base model directory with one defect, found before any engine is built
    (lambda f: [*distill(f), "--model", str(f["b_no_weights"])], f"{R}/b_no_weights has no weights"),
    (lambda f: [*distill(f), "--model", str(f["b_bad_config"])], f"{R}/b_bad_config/config.json does not load"),
    (lambda f: [*distill(f), "--model", str(f["b_truncated"])], "is not a readable safetensors file"),
    # a SpeLLM directory with one defect, in every command that loads one
    *[(lambda f, command=command, name=name: [*command(f, name)], f"{R}/{name}{expected}")
      for name, expected in MODEL_DEFECTS.items() for command in MODEL_COMMANDS],
]
OUTPUTS = ("out", "report", "exported", "lf.json", "op.json", "e.json")  # what a refused command must not have created


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(files, monkeypatch, capfd):
    assert len(CASES) >= 120
    for make, expected in CASES:
        command = make(files)
        line = one_line_error(run_script(command, monkeypatch, capfd))
        assert expected.replace(R, str(files["root"])) in line, (command, line)
    for name in OUTPUTS:
        assert not (files["root"] / name).exists(), name
    assert (files["root"] / "a_file").read_text() == "not a directory"


SMOKE = [  # a flag, a file read once the process group is up, the spellm command's dispatch
    (lambda f: distill(f, "--eval_every", "0"), "--eval_every 0"),
    (lambda f: distill(f, "--data", str(f["root"] / "binary.txt")), f"{R}/binary.txt"),
    (lambda f: ["-m", "spellm_ds", "report", "--model", str(f["spellm"]), "--tau", "high"], "--tau"),
]


@pytest.mark.processes
@pytest.mark.parametrize("case", range(len(SMOKE)))
def test_a_bad_input_in_a_real_process_is_one_line_exit_2(files, case):
    make, expected = SMOKE[case]
    env = rank_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_PORT=str(free_port()))
    result = subprocess.run([sys.executable, *make(files)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env=env)
    assert expected.replace(R, str(files["root"])) in one_line_error(result)
