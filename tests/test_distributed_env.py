"""Rank discovery from constructed launcher environments."""

import pytest

from spellm_ds.errors import SpellmError
from spellm_ds.runtime.distributed import discover_environment, threads_per_rank


def found(env):
    out = discover_environment(env)
    return int(out["RANK"]), int(out["WORLD_SIZE"]), int(out["LOCAL_RANK"]), out["MASTER_ADDR"], out["MASTER_PORT"]


@pytest.mark.processes
def test_deepspeed_launcher_and_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6000"}
    assert found(env) == (3, 4, 1, "10.0.0.1", "6000")
    # torchrun inside an sbatch job: its variables win over SLURM's (one task per node)
    env |= {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NNODES": "2"}
    assert found(env)[:3] == (3, 4, 1)


def test_open_mpi():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert found(env) == (1, 2, 1, "127.0.0.1", "29500")


def test_pmi():
    assert found({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MASTER_ADDR": "h"})[:4] == (2, 4, 0, "h")


def test_slurm_one_task_per_rank():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
           "MASTER_ADDR": "node1", "MASTER_PORT": "5555"}
    assert found(env) == (3, 4, 1, "node1", "5555")


def test_slurm_one_task_per_node_without_launcher_variables():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NNODES": "2", "MASTER_ADDR": "n0"}
    assert found(env)[:3] == (1, 2, 0)


def test_single_process():
    assert found({}) == (0, 1, 0, "127.0.0.1", "29500")


@pytest.mark.parametrize("env, message", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "inconsistent launcher environment: rank 2, world size 2"),
    ({"RANK": "1"}, "inconsistent launcher environment"),
    ({"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "2"}, "not integers"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NNODES": "2"}, "MASTER_ADDR is not set in a multi-node job"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "local rank 1"),
])
def test_inconsistent_environments_are_clear_errors(env, message):
    with pytest.raises(SpellmError, match=message):
        discover_environment(env)


def test_threads_share_the_node_cores_between_its_ranks():
    assert threads_per_rank({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}, cores=16) == 3  # the user's choice
    assert threads_per_rank({"LOCAL_SIZE": "2"}, cores=2) == 1  # deepspeed launcher
    assert threads_per_rank({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, cores=16) == 8  # mpirun
    assert threads_per_rank({"SLURM_NTASKS_PER_NODE": "4"}, cores=2) == 1  # never 0
    assert threads_per_rank({}, cores=16) is None  # unknown: torch's own default


def test_a_stale_op_build_lock_is_removed_and_a_fresh_one_reported(tmp_path, monkeypatch, capsys):
    """A killed just-in-time build leaves a lock torch would wait on forever; an old one is removed
    before the process group starts, a fresh one (a build may be running) only reported."""
    import os
    import time

    from spellm_ds.runtime.distributed import STALE_BUILD_LOCK_S, clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "py311_cpu" / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.write_text("")
    old = time.time() - STALE_BUILD_LOCK_S - 60
    os.utime(stale, (old, old))
    assert clear_stale_build_locks() == [stale]
    assert not stale.exists() and fresh.exists()
    out = capsys.readouterr().out
    assert f"removed a stale op-build lock {stale}" in out and f"an op build holds {fresh}" in out
