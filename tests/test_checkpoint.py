"""Checkpoints with real ranks: exact resume, SIGTERM, kill -9, bad --resume, export."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from spellm_ds.data.packing import first_read_steps, step_rows
from spellm_ds.distill.checkpoint import BEFORE_THE_FLAG, check_compatible, complete_checkpoints, saved_run, step_of
from spellm_ds.distill.config import RunConfig, resolve_student_config
from spellm_ds.errors import SpellmError
from spellm_ds.model.spellm import load
from tests import tiny
from tests.distributed import ROOT, free_port, rank_env, scalars, torchrun
from tests.entry_points import run_script
from tests.test_data import one_line_error


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return tiny.tiny_setup(root)


def args(base, out, *extra):
    model_dir, data = base
    return ["--model", str(model_dir), "--data", str(data), "--output_dir", str(out), "--k", "6",
            "--trainable_layers", "2", "--seq_len", "32", "--micro_batch", "2", "--lr", "3e-3", "--warmup", "2",
            "--eval_every", "1000", "--eval_blocks", "4", *extra]


def ok(result):
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(out):
    return [v for _, v in scalars(out / "tensorboard")["loss/total"]]


@pytest.mark.processes
def test_resume_is_the_same_run(base, tmp_path):
    """Bit for bit, with a sampled spelling KL (its sample, like the batch, is fixed by the step),
    soft targets from the teacher's top-16, and the teacher cache over six blocks, the resumed run
    reading the entries its first part wrote. The teacher is fully sharded (its forward gathers,
    collectives), and in the second step rank 0 reads first-pass blocks, rank 1 second-pass ones it
    could read from the cache: the ranks must agree to run the teacher, or the job hangs. A third run
    linking in the first one's cache (--teacher_cache_from) reads it from the first step on: the
    same losses, bit for bit."""
    first_read = first_read_steps(6, 4, seed=1)
    for rank, readable in enumerate((False, True)):  # the second step's case, with these blocks and seed
        rows, _ = step_rows(6, 1, 0, 1, 2, rank, 2, seed=1)
        assert bool((first_read[rows] < 1).all()) == readable
    sharded = json.loads((ROOT / "ds_configs" / "teacher.json").read_text())
    sharded["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "sharded_teacher.json").write_text(json.dumps(sharded))
    levers = ["--spelling_kl_weight", "0.5", "--spelling_kl_fraction", "0.5", "--soft_char_candidates", "16",
              "--teacher_cache", "--train_blocks", "6", "--seed", "1",
              "--teacher_deepspeed", str(tmp_path / "sharded_teacher.json"),
              "--collective_timeout_s", "60"]
    ok(torchrun(args(base, tmp_path / "straight", "--max_steps", "6", "--save_every", "0", *levers)))
    stopped = ok(torchrun(args(base, tmp_path / "split", "--max_steps", "6", "--save_every", "0", "--stop_at", "3",
                               *levers)))
    assert "stopped by --stop_at after step 3" in stopped.stdout
    assert not (tmp_path / "split" / "model").exists()
    resumed = ok(torchrun(args(base, tmp_path / "split", "--max_steps", "6", "--save_every", "0", *levers)))
    assert "at step 3" in resumed.stdout
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")  # all six, bit for bit
    reads = [v for _, v in scalars(tmp_path / "split" / "tensorboard")["perf/teacher_cache_read"]]
    assert reads == [0, 0, 1, 1, 1, 1]
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and any(n.startswith("char_heads.") for n in a)
    assert all(torch.equal(a[n], b[n]) for n in a)
    kept = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step3", "step6"]
    # a run linking in the straight run's cache reads every block from the first step, to the same run
    ok(torchrun(args(base, tmp_path / "shared", "--max_steps", "6", "--save_every", "0", *levers,
                     "--teacher_cache_from", str(tmp_path / "straight"))))
    assert losses(tmp_path / "shared") == losses(tmp_path / "straight")
    assert [v for _, v in scalars(tmp_path / "shared" / "tensorboard")["perf/teacher_cache_read"]] == [1] * 6


def command_line(process: psutil.Process) -> str:
    """A process's command line; empty for one that exited (or is a zombie) while being listed."""
    try:
        return " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return ""


def worker_pids(launcher: subprocess.Popen, count: int, timeout: float = 120) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        workers = [c for c in psutil.Process(launcher.pid).children(recursive=True) if "distill.py" in command_line(c)]
        if len(workers) == count:
            return [w.pid for w in sorted(workers, key=lambda w: w.pid)]
        time.sleep(0.5)
    raise AssertionError("workers did not start")


def wait_for_checkpoint(out, process, timeout=240):
    """Any complete checkpoint: older ones are pruned a few steps later, so polling for one step can miss it."""
    deadline = time.time() + timeout
    while not complete_checkpoints(out):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, f"no complete checkpoint in {out} after {timeout} s"
        time.sleep(0.1)


@pytest.mark.processes
def test_sigterm_to_one_rank_saves_and_exits_zero(base, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(ROOT / "launch" / "distill.py"),
               *args(base, out, "--max_steps", "400", "--save_every", "2")]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=rank_env(), cwd=ROOT)
    wait_for_checkpoint(out, launcher)
    rank_pids = worker_pids(launcher, 2)
    os.kill(rank_pids[-1], signal.SIGTERM)  # one rank only: the ranks must agree by themselves
    stdout, stderr = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, stderr[-3000:]
    line = next(l for l in stdout.splitlines() if l.startswith("stopped by signal after step"))
    stop_step = int(line.split("after step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step{stop_step}" / "COMPLETE").is_file() and stop_step < 400
    resumed = ok(torchrun(args(base, out, "--max_steps", "400", "--save_every", "0", "--stop_at", str(stop_step + 2))))
    assert f"resumed from {out / 'checkpoints' / f'step{stop_step}'} at step {stop_step}" in resumed.stdout
    steps = [s for s, _ in scalars(out / "tensorboard")["loss/total"]]
    assert steps == list(range(1, stop_step + 3))


@pytest.mark.processes
def test_killed_rank_ends_the_job_and_resume_ignores_half_written(base, tmp_path):
    """Ranks started directly (as srun or mpirun would), so only the collective time-out can end rank 0."""
    out = tmp_path / "run"
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, str(ROOT / "launch" / "distill.py"),
                               *args(base, out, "--max_steps", "400", "--save_every", "2", "--collective_timeout_s", "20")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=rank_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_PORT=port))
             for r in range(2)]
    wait_for_checkpoint(out, ranks[0])
    ranks[1].kill()
    started = time.time()
    ranks[0].communicate(timeout=180)
    ranks[1].communicate()
    assert ranks[0].returncode != 0 and time.time() - started < 180
    last = step_of(complete_checkpoints(out)[-1])
    half = out / "checkpoints" / "step999"
    half.mkdir()
    (half / "spellm_state.json").write_text("{}")
    resumed = ok(torchrun(args(base, out, "--max_steps", "400", "--save_every", "0", "--collective_timeout_s", "20",
                                "--stop_at", str(last + 1))))
    assert f"at step {last}" in resumed.stdout


def run_single(base, out, *extra):
    return subprocess.run([sys.executable, str(ROOT / "launch" / "distill.py"), *args(base, out, *extra)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=rank_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_PORT=str(free_port())))


@pytest.mark.processes
def test_bad_resume_and_export(base, tmp_path, monkeypatch, capfd):
    """A checkpoint that does not match the run, or is damaged or corrupt, is refused with one line
    (the refusals run in this process: they come before any engine is built) and nothing in it
    changes; export writes the same model as the run did, only into an empty directory."""
    out = tmp_path / "run"

    def refused(*extra: str, command: list[str] | None = None) -> str:
        command = command or ["launch/distill.py", *args(base, out, *extra)]
        return one_line_error(run_script(command, monkeypatch, capfd))

    ok(run_single(base, out, "--max_steps", "2", "--save_every", "0"))
    step2 = out / "checkpoints" / "step2"
    before = {p.name: p.read_bytes() for p in step2.iterdir() if p.is_file()}
    assert "does not exist" in refused("--resume", str(out / "nope"), "--max_steps", "4")
    # every flag that defines the run (model, split, data order, schedule) must match the checkpoint's
    changed = {("--k", "5"): "--k 6, this run has 5", ("--seed", "1"): "--seed 0, this run has 1",
               ("--eval_fraction", "0.1"): "--eval_fraction 0.02, this run has 0.1",
               ("--micro_batch", "4"): "--micro_batch 2, this run has 4",
               ("--lr", "0.001"): "--lr 0.003, this run has 0.001", ("--warmup", "5"): "--warmup 2, this run has 5",
               ("--no-ignore_after_end",): "--ignore_after_end True, this run has False",
               ("--reg_target", "label"): "--reg_target 'teacher', this run has 'label'",
               ("--data", str(base[0] / "config.json")): "other data content",
               ("--max_steps", "4"): "--max_steps 2, this run has 4"}
    for flags, message in changed.items():
        line = refused("--max_steps", "2", *flags)
        assert message in line and str(step2) in line, line
    # the same data through another path is the same run; edited data is not
    moved_data = tmp_path / "elsewhere.txt"
    moved_data.write_bytes(base[1].read_bytes())
    same = ok(run_single(base, out, "--max_steps", "2", "--save_every", "0", "--data", str(moved_data)))
    assert "the run already finished" in same.stdout
    moved_data.write_text(moved_data.read_text() + "\n\nAn edited last paragraph.")
    edited = refused("--max_steps", "2", "--data", str(moved_data))
    assert "made from other data content" in edited and str(step2) in edited, edited
    # resuming a finished run says so and exports the same model again
    first_export = load_file(out / "model" / "model.safetensors")
    again = ok(run_single(base, out, "--max_steps", "2", "--save_every", "0"))
    assert "the run already finished" in again.stdout
    assert all(torch.equal(first_export[n], t) for n, t in load_file(out / "model" / "model.safetensors").items())
    other = tiny.tiny_llama_dir(tmp_path / "other", tiny.corpus_texts(20), layers=3)
    other_args = args(base, out, "--max_steps", "4")
    other_args[1] = str(other)
    assert "was made from other model content" in refused(command=["launch/distill.py", *other_args])
    damaged = tmp_path / "damaged" / "step2"
    shutil.copytree(step2, damaged)
    (damaged / "rng_rank0.safetensors").unlink()
    assert "is damaged (rng_rank0.safetensors is missing)" in refused("--resume", str(damaged), "--max_steps", "2")
    corrupt = out / "checkpoints" / "step7"
    corrupt.mkdir()
    (corrupt / "COMPLETE").write_text("step 7\n")  # as checkpoints before the file list have it
    (corrupt / "spellm_state.json").write_text("{garbage")
    assert "is corrupt" in refused("--resume", str(corrupt), "--max_steps", "8")
    assert {p.name: p.read_bytes() for p in step2.iterdir() if p.is_file()} == before  # nothing overwritten

    exported = tmp_path / "exported"
    cli = subprocess.run([sys.executable, str(ROOT / "launch" / "export.py"), "--checkpoint", str(step2),
                          "--out", str(exported)], capture_output=True, text=True, timeout=300, cwd=ROOT, env=rank_env())
    assert cli.returncode == 0, cli.stderr
    a, b = load_file(exported / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    base_weights = load_file(base[0] / "model.safetensors")
    frozen = [n for n in base_weights if ".mlp." not in n or ".layers.0." in n or ".layers.1." in n]
    assert all(torch.equal(a["base." + n], base_weights[n]) for n in frozen)
    assert load(exported).config.k == 6
    # only what changed (heads, spellings, trained weights that moved); loads as the whole export
    changed = tmp_path / "changed"
    ok(run_script(["launch/export.py", "--checkpoint", str(step2), "--out", str(changed), "--changed_only"],
                  monkeypatch, capfd))
    stored = load_file(changed / "model.safetensors")
    moved = {"base." + n for n, t in base_weights.items() if not torch.equal(a["base." + n], t)}
    assert {n for n in stored if n.startswith("base.")} == moved and "char_heads.proj.weight" in stored
    whole, assembled = load(exported).state_dict(), load(changed).state_dict()
    assert whole.keys() == assembled.keys() and all(torch.equal(whole[n], assembled[n]) for n in whole)
    assert "only those that differ" in (changed / "README.md").read_text()
    assert "not empty" in refused(command=["launch/export.py", "--checkpoint", str(step2), "--out", str(exported)])
    # non-finite weights in a checkpoint (edited, or written by something else) are never exported
    poisoned = tmp_path / "poisoned" / "step2"
    shutil.copytree(step2, poisoned)
    optimizer = next(poisoned.glob("*optim_states.pt"))
    states = torch.load(optimizer, weights_only=False)
    with torch.no_grad():  # the flat fp32 masters are saved as leaves that require grad
        states["optimizer_state_dict"]["fp32_flat_groups"][0][:10] = float("nan")
    buffer = io.BytesIO()
    torch.save(states, buffer)
    tamper(poisoned, optimizer.name, buffer.getvalue())
    nan_export = refused(command=["launch/export.py", "--checkpoint", str(poisoned), "--out", str(tmp_path / "nan")])
    assert "holds non-finite weights" in nan_export and not (tmp_path / "nan").exists()
    # the spelling temperature is fitted on the run's held-out documents: export needs its data
    moved = tmp_path / "moved" / "step2"
    shutil.copytree(step2, moved)
    state = json.loads((moved / "spellm_state.json").read_text())
    state["run"]["data"] = [str(tmp_path / "moved.txt")]
    tamper(moved, "spellm_state.json", json.dumps(state).encode())
    gone = refused(command=["launch/export.py", "--checkpoint", str(moved), "--out", str(tmp_path / "not-written")])
    assert f"the run's data {tmp_path / 'moved.txt'} is gone; restore it" in gone
    assert not (tmp_path / "not-written").exists()


def tamper(checkpoint, name: str, data: bytes) -> None:
    """Replace a checkpoint's file and the size its COMPLETE marker records, as someone editing both
    would: the file's content, not the marker, must stop the load."""
    (checkpoint / name).write_bytes(data)
    marker = json.loads((checkpoint / "COMPLETE").read_text())
    marker["bytes"][name] = len(data)
    (checkpoint / "COMPLETE").write_text(json.dumps(marker))


class Planted:
    """A pickle that runs a command when it is unpickled."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.processes
def test_a_planted_pickle_in_any_checkpoint_file_is_refused_and_runs_nothing(base, tmp_path, monkeypatch, capfd):
    """Resume and export load DeepSpeed's files with torch.load forced to weights_only=True: a file
    that names code (os.system here) stops them with one line, and the command never runs; the RNG
    state is safetensors, which carries no code, and a garbage one is refused the same way."""
    out = tmp_path / "run"
    ok(run_single(base, out, "--max_steps", "2", "--save_every", "1", "--keep_checkpoints", "2"))
    step2 = out / "checkpoints" / "step2"
    pickled = sorted(step2.glob("*.pt"))
    bf16 = json.loads((out / "run_config.json").read_text())["precision"]["bf16"]  # DeepSpeed names the file by it
    assert {p.name for p in pickled} == {"zero_pp_rank_0_mp_rank_00_model_states.pt",
                                         f"{'bf16_' if bf16 else ''}zero_pp_rank_0_mp_rank_00_optim_states.pt"} \
        and not list(step2.glob("rng*.pt"))
    for victim in pickled:
        planted = tmp_path / f"planted-{victim.stem}"
        shutil.copytree(step2, planted)
        marker = tmp_path / f"ran-{victim.stem}"
        state = torch.load(victim, weights_only=False)
        state["payload"] = Planted(marker)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        tamper(planted, victim.name, buffer.getvalue())
        refused = one_line_error(run_single(base, out, "--resume", str(planted), "--max_steps", "3",
                                            "--extend_schedule"))
        assert "names code to run when loaded" in refused and "refused" in refused, refused
        exported = run_script(["launch/export.py", "--checkpoint", str(planted), "--out", str(tmp_path / "never")],
                              monkeypatch, capfd)
        assert "names code to run when loaded" in one_line_error(exported)  # export reads both files
        assert not marker.exists() and not (tmp_path / "never").exists()
    garbage = tmp_path / "garbage-rng"
    shutil.copytree(step2, garbage)
    tamper(garbage, "rng_rank0.safetensors", b"\x00" * 64)
    assert "is not a valid RNG state" in one_line_error(run_single(base, out, "--resume", str(garbage),
                                                                   "--max_steps", "3", "--extend_schedule"))
    resumed = ok(run_single(base, out, "--max_steps", "3", "--extend_schedule"))  # the untouched one still resumes
    assert "at step 2" in resumed.stdout


@pytest.mark.processes
def test_a_fresh_run_never_overwrites_one_without_overwrite(base, tmp_path):
    """--resume none into a finished run is refused and writes nothing; with --overwrite the old run
    is renamed aside whole and the new one starts in an empty directory."""
    out = tmp_path / "run"
    ok(run_single(base, out, "--max_steps", "2", "--save_every", "0"))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refused = one_line_error(run_single(base, out, "--max_steps", "2", "--resume", "none"))
    assert "holds a run that starting anew would overwrite" in refused and "--overwrite" in refused
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    replaced = ok(run_single(base, out, "--max_steps", "3", "--resume", "none", "--overwrite"))
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and str(aside[0]) in replaced.stdout
    assert {p.relative_to(aside[0]): p.read_bytes() for p in aside[0].rglob("*") if p.is_file()} == before
    assert [step_of(p) for p in complete_checkpoints(out)] == [3]


@pytest.mark.processes
def test_a_non_finite_loss_stops_the_run_keeps_the_last_good_checkpoint_and_exports_nothing(base, tmp_path):
    out = tmp_path / "run"
    result = run_single(base, out, "--max_steps", "8", "--save_every", "1", "--keep_checkpoints", "8",
                        "--lr", "1e30", "--warmup", "1")
    line = one_line_error(result)
    assert "is nan" in line or "is inf" in line, line
    step = int(line.split("step ")[1].split(":")[0])
    kept = [step_of(p) for p in complete_checkpoints(out)]
    assert kept == list(range(1, step)) and f"the last good checkpoint is {out / 'checkpoints'}" in line
    assert not (out / "model").exists()
    assert "--lr inf is not a finite number" in one_line_error(run_single(base, tmp_path / "x", "--lr", "inf"))


@pytest.mark.processes
def test_extend_schedule_trains_on_from_a_finished_run(base, tmp_path):
    out, straight = tmp_path / "run", tmp_path / "straight"
    ok(run_single(base, out, "--max_steps", "2", "--save_every", "0"))
    ok(run_single(base, straight, "--max_steps", "4", "--save_every", "0"))
    short = dict(scalars(out / "tensorboard")["lr"])
    extended = ok(run_single(base, out, "--max_steps", "4", "--save_every", "0", "--extend_schedule"))
    assert "at step 2" in extended.stdout
    lr, straight_lr = dict(scalars(out / "tensorboard")["lr"]), dict(scalars(straight / "tensorboard")["lr"])
    assert sorted(lr) == [1, 2, 3, 4] and [lr[1], lr[2]] == [short[1], short[2]]
    # from the resumed step on, the LR is the 4-step schedule's: its decay laid over the new total
    assert [lr[3], lr[4]] == [straight_lr[3], straight_lr[4]] and lr[3] > lr[4]


def test_a_checkpoint_older_than_a_flag_reads_as_the_run_it_was():
    """Flags added after a checkpoint was written take what that run did, not today's default."""
    current = RunConfig().to_dict()
    old_state = {"run": {key: value for key, value in current.items() if key not in BEFORE_THE_FLAG}}
    assert {key: saved_run(old_state)[key] for key in BEFORE_THE_FLAG} == BEFORE_THE_FLAG
    new_state = {"run": {**current, "ignore_after_end": True, "reg_target": "teacher"}}
    assert saved_run(new_state)["ignore_after_end"] is True and saved_run(new_state)["reg_target"] == "teacher"


def test_a_checkpoint_that_trained_the_blocks_at_the_heads_lr_is_refused_with_the_way_out(tmp_path):
    """Before --ffn_lr had a default, None meant one parameter group at --lr; the optimizer state
    of such a checkpoint cannot load into today's two groups."""
    run = RunConfig(trainable_layers=5)
    resolve_student_config(run, world_size=1)
    state = {"run": {**run.to_dict(), "ffn_lr": None}}
    with pytest.raises(SpellmError, match="one parameter group .* cannot resume: export it"):
        check_compatible(state, run.to_dict(), charset=None, world_size=1, checkpoint=tmp_path)


def test_a_checkpoint_of_blocks_packed_another_way_is_refused(tmp_path):
    """A run resumed after the packing changed would read other blocks for the rest of its steps;
    a checkpoint from before the version was recorded was packed by version 1."""
    from spellm_ds.data.packing import PACKING_VERSION
    from spellm_ds.model.charset import Charset

    run, charset = RunConfig().to_dict(), Charset.default()
    (tmp_path / "rng_rank0.safetensors").touch()
    content = {"data_sha256": "d", "model_sha256": "m", "packing_version": PACKING_VERSION}
    state = {"run": run, "charset": list(charset.symbols), "world_size": 1}
    check_compatible({**state, "content": content}, run, charset, world_size=1, checkpoint=tmp_path, content=content)
    for recorded in ({"data_sha256": "d", "model_sha256": "m"}, {**content, "packing_version": PACKING_VERSION + 1}):
        with pytest.raises(SpellmError, match="blocks of packing version .* start anew"):
            check_compatible({**state, "content": recorded}, run, charset, world_size=1, checkpoint=tmp_path,
                             content=content)
