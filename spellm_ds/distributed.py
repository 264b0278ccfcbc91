"""Rank discovery and process-group lifetime.

The ``deepspeed`` launcher and ``torchrun`` set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; under
``mpirun`` (Open MPI) they are mapped from ``OMPI_COMM_WORLD_*`` here, with the rendezvous on
``MASTER_ADDR`` (default 127.0.0.1) so DeepSpeed's own MPI discovery, which picks the external
interface, is not needed. Collectives time out after ``timeout_s``: a dead rank ends the job
instead of hanging it.
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta

import deepspeed
import torch.distributed as dist

_MPI_VARS = {"RANK": "OMPI_COMM_WORLD_RANK", "WORLD_SIZE": "OMPI_COMM_WORLD_SIZE",
             "LOCAL_RANK": "OMPI_COMM_WORLD_LOCAL_RANK"}


def discover_environment(env: dict[str, str]) -> dict[str, str]:
    """The torch.distributed variables for this process, from whatever launched it."""
    found = {name: env[name] for name in (*_MPI_VARS, "MASTER_ADDR", "MASTER_PORT") if name in env}
    for name, mpi_name in _MPI_VARS.items():
        if name not in found and mpi_name in env:
            found[name] = env[mpi_name]
    found.setdefault("RANK", "0")
    found.setdefault("WORLD_SIZE", "1")
    found.setdefault("LOCAL_RANK", "0")
    found.setdefault("MASTER_ADDR", "127.0.0.1")
    found.setdefault("MASTER_PORT", "29500")
    return found


def init(timeout_s: float) -> tuple[int, int]:
    """Join (or, alone, create) the process group; returns (rank, world size)."""
    os.environ.update(discover_environment(dict(os.environ)))
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


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
