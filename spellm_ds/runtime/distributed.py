"""Rank discovery and process-group lifetime.

Whatever started the process, the torch.distributed variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) are settled here, first match wins:

1. launchers that set them: the ``deepspeed`` launcher, ``torchrun`` (also inside an sbatch job);
2. Open MPI's ``mpirun``: ``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK}``;
3. MPICH / Intel MPI / PMI: ``PMI_RANK``, ``PMI_SIZE`` (local rank from ``MPI_LOCALRANKID``);
4. SLURM ``srun`` with one task per rank: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``;
5. nothing: a single process.

``MASTER_ADDR`` defaults to 127.0.0.1 on one node; a multi-node job must set it (the sbatch
template does, from ``scontrol show hostnames``). DeepSpeed's own MPI discovery, which picks the
external interface, is never needed. Collectives time out after ``timeout_s``: a dead rank ends
the job instead of hanging it.
"""

from __future__ import annotations

import gc
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from spellm_ds.errors import SpellmError

DEFAULT_PORT = "29500"
_SOURCES = (
    ("launcher", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("SLURM", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


def discover_environment(env: dict[str, str]) -> dict[str, str]:
    """The torch.distributed variables for this process, from whatever launched it."""
    for source, rank_var, size_var, local_var in _SOURCES:
        if rank_var in env or size_var in env:
            break
    else:
        source, rank_var, size_var, local_var = "single process", "", "", ""
    try:
        rank = int(env.get(rank_var, 0))
        world_size = int(env.get(size_var, 1))
        local_rank = int(env.get(local_var) or env.get("LOCAL_RANK") or 0)
    except ValueError:
        raise SpellmError(f"{source} rank variables are not integers ({rank_var}={env.get(rank_var)!r}, "
                          f"{size_var}={env.get(size_var)!r}); check the launcher") from None
    if not 0 <= rank < world_size or not 0 <= local_rank <= rank:
        raise SpellmError(f"inconsistent {source} environment: rank {rank}, world size {world_size}, "
                          f"local rank {local_rank}; launch every rank with the same world size")
    nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
    if "MASTER_ADDR" not in env and world_size > 1 and nodes > 1:
        raise SpellmError("MASTER_ADDR is not set in a multi-node job; export MASTER_ADDR=$(scontrol show "
                          "hostnames $SLURM_JOB_NODELIST | head -n1) (launch/slurm/distill.sbatch does)")
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank),
            "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"), "MASTER_PORT": env.get("MASTER_PORT", DEFAULT_PORT)}


_LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                         "SLURM_NTASKS_PER_NODE")


def threads_per_rank(env: dict[str, str], cores: int) -> int | None:
    """CPU threads for this rank so that the ranks of one node share its cores without
    oversubscribing them: ``OMP_NUM_THREADS`` when set, else cores / ranks on this node (torchrun
    sets the variable; the deepspeed launcher, ``mpirun`` and ``srun`` do not, and torch would give
    every rank all the cores). None when the node's rank count is unknown."""
    if env.get("OMP_NUM_THREADS"):
        return int(env["OMP_NUM_THREADS"])
    for name in _LOCAL_SIZE_VARIABLES:
        if env.get(name, "").isdigit() and int(env[name]) > 0:
            return max(1, cores // int(env[name]))
    return None


STALE_BUILD_LOCK_S = 600
"""A just-in-time build lock older than this has no build behind it (DeepSpeed's ops build in under a minute)."""


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove the locks a killed just-in-time op build left in torch's extension cache: torch waits
    on such a lock forever, so every later start would hang without a word. A younger lock is
    reported (a build may be running). Returns the locks removed."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    removed = []
    for lock in sorted(root.glob("**/lock")) if root.is_dir() else []:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # another rank removed it
            continue
        if age > max_age_s:
            lock.unlink(missing_ok=True)
            removed.append(lock)
            print(f"removed a stale op-build lock {lock} ({age / 60:.0f} minutes old: an interrupted build)",
                  flush=True)
        else:
            print(f"an op build holds {lock} ({age:.0f} s old); waiting for it (delete the file if no build runs)",
                  flush=True)
    return removed


def init(timeout_s: float) -> tuple[int, int]:
    """Join (or, alone, create) the process group; returns (rank, world size)."""
    clear_stale_build_locks()
    os.environ.update(discover_environment(dict(os.environ)))
    threads = threads_per_rank(dict(os.environ), len(os.sched_getaffinity(0)))
    if threads is not None:
        torch.set_num_threads(threads)
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    node = os.environ.get("SLURM_NODEID", "-")
    print(f"rank {rank}/{world_size} local {os.environ['LOCAL_RANK']} node {node} "
          f"master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} threads {torch.get_num_threads()}", flush=True)
    return rank, world_size


def teardown() -> None:
    """Destroy the process groups, after collecting objects that still hold them.

    A gloo group that outlives ``destroy_process_group`` (DeepSpeed engines keep handles to it in
    reference cycles) is torn down during interpreter exit, where its I/O thread can abort the
    process (SIGABRT, "terminate called without an active exception") after a successful run.
    """
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def free_port() -> int:
    """A TCP port free on this host now (for a local rendezvous: tests, benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
