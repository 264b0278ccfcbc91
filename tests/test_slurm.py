"""The real launch/slurm/distill.sbatch on a real 2-node SLURM cluster (this machine), and mpirun."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from spellm_ds.distill.checkpoint import complete_checkpoints
from tests import tiny
from tests.distributed import ROOT, VENV_BIN, free_port, rank_env, scalars
from tests.slurm_cluster import Cluster, Unavailable

SBATCH = str(ROOT / "launch" / "slurm" / "distill.sbatch")
pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    cluster = Cluster(root)
    try:
        cluster.start()
    except Unavailable as reason:
        cluster.stop()
        pytest.skip(f"no local SLURM cluster: {reason}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-data")
    return tiny.tiny_setup(root)


def job_env(out_dir) -> dict:
    return rank_env(PYTHON=str(VENV_BIN / "python"), OUTPUT_DIR=str(out_dir), MASTER_ADDR="127.0.0.1",
                    PROCS_PER_NODE="1", PATH=f"{VENV_BIN}:{os.environ['PATH']}")


def distill_flags(tiny_run, steps, save_every):
    model_dir, data = tiny_run
    return ["--model", str(model_dir), "--data", str(data), "--k", "6", "--trainable_layers", "2", "--seq_len", "32",
            "--micro_batch", "2", "--max_steps", str(steps), "--save_every", str(save_every), "--eval_every", "1000",
            "--eval_blocks", "4", "--collective_timeout_s", "60"]


@pytest.mark.slurm
def test_two_node_job_completes(cluster, tiny_run, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "job.out"
    job = cluster.submit(["--nodes=2", f"--output={log}", f"--chdir={ROOT}", SBATCH, *distill_flags(tiny_run, 6, 3)],
                         job_env(out))
    info = cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=400)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert re.search(r"rank 0/2 local 0 node 0 ", text) and re.search(r"rank 1/2 local 0 node 1 ", text)
    assert (out / "checkpoints" / "step6" / "COMPLETE").is_file()
    assert [s for s, _ in scalars(out / "tensorboard")["loss/total"]] == list(range(1, 7))
    assert json.loads((out / "model" / "config.json").read_text())["k"] == 6


@pytest.mark.slurm
def test_preempted_job_is_requeued_and_resumes(cluster, tiny_run, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "job.out"
    job = cluster.submit(["--nodes=2", f"--output={log}", f"--chdir={ROOT}", SBATCH, *distill_flags(tiny_run, 24, 2)],
                         job_env(out))
    deadline = time.time() + 300
    while not complete_checkpoints(out):  # any one: step2 is pruned a few steps after it lands
        assert time.time() < deadline, log.read_text()[-3000:] if log.exists() else "no job output"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=TERM", job], env=cluster.env, check=True, timeout=30)
    info = cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=500)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert int(info.get("Restarts", "0")) == 1, text[-2000:]
    stopped = int(re.search(r"stopped by signal after step (\d+)", text).group(1))
    assert f"resumed from {out / 'checkpoints' / f'step{stopped}'} at step {stopped}" in text
    assert "restart 1" in text and (out / "model" / "config.json").is_file()
    steps = [s for s, _ in scalars(out / "tensorboard")["loss/total"]]
    assert steps == list(range(1, 25))  # the step count continued where the first run stopped


def test_mpirun_two_ranks(tiny_run, tmp_path):
    mpirun = VENV_BIN / "mpirun"
    if not mpirun.exists():
        pytest.skip("no mpirun in the virtual environment")
    out = tmp_path / "run"
    result = subprocess.run([str(mpirun), "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable,
                             str(ROOT / "launch" / "distill.py"), "--output_dir", str(out),
                             *distill_flags(tiny_run, 3, 0)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env=rank_env(MASTER_PORT=str(free_port()), OMP_NUM_THREADS=""))
    assert result.returncode == 0, result.stderr[-3000:]
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # mpirun sets no thread count: the ranks share the cores
    assert "rank 0/2" in result.stdout and "rank 1/2" in result.stdout
    assert result.stdout.count(f" threads {threads}\n") == 2, result.stdout
    losses = scalars(out / "tensorboard")["loss/total"]
    assert [s for s, _ in losses] == [1, 2, 3] and all(0 < v < 100 for _, v in losses)
    assert json.loads((out / "model" / "config.json").read_text())["k"] == 6


def test_dry_run_prints_each_node_command():
    result = subprocess.run(["bash", SBATCH, "--max_steps", "7"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env=rank_env(DRY_RUN="1", SLURM_NNODES="3", MASTER_ADDR="10.1.2.3", MASTER_PORT="4242",
                                         PROCS_PER_NODE="4"))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("node ")]
    assert len(lines) == 3
    for node, line in enumerate(lines):
        assert f"--nnodes 3 --node_rank {node} --nproc_per_node 4 --master_addr 10.1.2.3 --master_port 4242" in line
        assert line.endswith("--max_steps 7")
