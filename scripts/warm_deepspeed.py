"""Build DeepSpeed's just-in-time CPU comm op once, so tests and runs do not each pay ~30 s.

Runs a one-rank gloo process group through ``deepspeed.init_distributed`` and tears it down,
after clearing a stale build lock an interrupted build left (torch would wait on it forever).
"""

import os
import socket
import time

import deepspeed
import torch.distributed as dist

from spellm_ds.runtime.distributed import clear_stale_build_locks

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
start = time.time()
clear_stale_build_locks()
deepspeed.init_distributed(dist_backend="gloo")
dist.destroy_process_group()
print(f"deepspeed op cache warm ({time.time() - start:.1f} s)")
