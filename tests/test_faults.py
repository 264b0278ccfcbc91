"""Faults injected into real runs: SIGKILL to both ranks of a 2-rank run at random moments of
training and saving, to exports at random moments, and a checkpoint file cut short. Every kill
must leave complete checkpoints intact, a run that resumes from the newest of them, and an
exported model that loads whole."""

import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from spellm_ds.distill.checkpoint import COMPLETE, complete_checkpoints, damage, read_state, step_of
from spellm_ds.model.spellm import load
from spellm_ds.runtime.atomic import recover_dir
from tests import tiny
from tests.distributed import ROOT, free_port, rank_env
from tests.test_checkpoint import args

TRAINING_KILLS = 14  # with the 6 export kills, the 20 trials issue 58 asks for
EXPORT_KILLS = 6


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny.tiny_setup(tmp_path_factory.mktemp("faults"))


def start_ranks(base, out, *extra) -> list[subprocess.Popen]:
    """Two ranks started directly (as srun or mpirun would), saving every step."""
    port = str(free_port())
    return [subprocess.Popen([sys.executable, str(ROOT / "launch" / "distill.py"),
                              *args(base, out, "--max_steps", "400", "--save_every", "1", *extra)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             env=rank_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_PORT=port))
            for r in range(2)]


def newest_step(out) -> int:
    found = complete_checkpoints(out)
    return step_of(found[-1]) if found else -1


def saving(out) -> bool:
    """A checkpoint is being written: its directory is there, its ``COMPLETE`` marker is not yet."""
    return any(not (p / COMPLETE).exists() for p in (out / "checkpoints").glob("step*"))


def assert_intact(out) -> None:
    """Every complete checkpoint holds the files its marker lists, and its state reads."""
    found = complete_checkpoints(out)
    assert found, "a kill left no complete checkpoint"
    for checkpoint in found:
        assert damage(checkpoint) is None, checkpoint
        assert read_state(checkpoint)["step"] == step_of(checkpoint)


@pytest.mark.processes
def test_kills_at_random_moments_lose_nothing_complete_and_every_run_resumes(base, tmp_path):
    rng = random.Random(0)
    out = tmp_path / "run"
    during_save = 0
    for trial in range(TRAINING_KILLS):
        before = newest_step(out)
        ranks = start_ranks(base, out)
        deadline = time.time() + 240
        while newest_step(out) <= before:  # the run got going: it saved past where it started
            assert all(r.poll() is None for r in ranks), ranks[0].communicate()[1][-3000:]
            assert time.time() < deadline, f"trial {trial}: no new checkpoint after 240 s"
            time.sleep(0.05)
        if trial % 2:  # a random moment
            time.sleep(rng.uniform(0.0, 1.0))
        else:  # the moment a save is seen under way, so that some kills surely land inside one
            while not saving(out) and time.time() < deadline:
                time.sleep(0.001)
        for rank in ranks:
            rank.send_signal(signal.SIGKILL)
        stdout = ranks[0].communicate()[0]
        ranks[1].communicate()
        during_save += saving(out)
        if before >= 0:
            assert f"resumed from {out / 'checkpoints' / f'step{before}'} at step {before}" in stdout, stdout[-2000:]
        assert_intact(out)
    assert during_save >= 1, "no kill landed inside a save: the trials test nothing about saving"

    # a file of the newest checkpoint cut short (a copy that stopped, a full disk): the one before it is taken
    *_, previous, newest = complete_checkpoints(out)
    optimizer_states = max(newest.glob("*optim_states.pt"), key=lambda p: p.stat().st_size)
    optimizer_states.write_bytes(optimizer_states.read_bytes()[: optimizer_states.stat().st_size // 2])
    ranks = start_ranks(base, out, "--stop_at", str(step_of(newest) + 2))
    stdout, stderr = ranks[0].communicate(timeout=300)
    ranks[1].communicate(timeout=60)
    assert ranks[0].returncode == 0 and ranks[1].returncode == 0, stderr[-3000:]
    assert f"checkpoint {newest} is damaged ({optimizer_states.name} holds" in stdout, stdout[-2000:]
    assert f"resumed from {previous} at step {step_of(previous)}" in stdout


@pytest.mark.processes
def test_kills_at_random_moments_of_an_export_leave_the_old_model_whole(base, tmp_path):
    out = tmp_path / "run"
    ranks = start_ranks(base, out, "--stop_at", "2")
    for rank in ranks:
        assert rank.wait(timeout=300) == 0, rank.communicate()[1][-3000:]
    checkpoint, target = complete_checkpoints(out)[-1], tmp_path / "model"
    export = [sys.executable, "-c", "import sys; from pathlib import Path; from spellm_ds.export.export import export; "
              "export(Path(sys.argv[1]), Path(sys.argv[2]))", str(checkpoint), str(target)]
    started = time.time()
    subprocess.run(export, check=True, capture_output=True, cwd=ROOT, env=rank_env(), timeout=300)
    seconds = time.time() - started
    reference = load_file(target / "model.safetensors")
    rng = random.Random(1)
    for _ in range(EXPORT_KILLS):
        process = subprocess.Popen(export, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                                   env=rank_env())
        time.sleep(rng.uniform(0.5 * seconds, 1.05 * seconds))  # the weights are written in the last part
        process.send_signal(signal.SIGKILL)
        process.wait()
        recover_dir(target)  # what the next export does first
        assert not list(tmp_path.glob(".model-*")), "an interrupted export's leftovers survived recovery"
        weights = load_file(target / "model.safetensors")
        assert weights.keys() == reference.keys() and all(torch.equal(weights[n], reference[n]) for n in weights)
        assert load(target).config.k == 6
