"""A real SLURM cluster on this machine: munged, slurmctld and one slurmd per simulated node.

Debian's slurm 22.05 packages are installed when missing (root + apt). Every daemon is started
with its file descriptors closed and stopped by its pid file, whatever happened.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from spellm_ds.runtime.distributed import free_port

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]


class Unavailable(Exception):
    """The environment cannot run a SLURM cluster (the reason is the message)."""


def ensure_installed() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable("slurm is not installed and this is not a root machine with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run = lambda *cmd: subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)  # noqa: E731
    result = run("apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES)
    if result.returncode != 0:
        run("apt-get", "update", "-q")
        result = run("apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES)
    if result.returncode != 0:
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr.strip()[-300:]}")


def start_daemon(command: list[str], env: dict[str, str] | None = None) -> None:
    subprocess.run(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   close_fds=True, start_new_session=True, check=True, timeout=60)


def alive(pid: int) -> bool:
    """PID 1 here reaps slowly: a zombie counts as dead."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"
    except (OSError, IndexError):
        return False


def stop_pidfile(path: Path) -> None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + 10
        while alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        if not alive(pid):
            return


class Cluster:
    def __init__(self, root: Path, nodes: int = 2) -> None:
        self.root = root
        self.nodes = [f"node{i + 1}" for i in range(nodes)]
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.started_munged = False

    def start(self) -> Cluster:
        ensure_installed()
        self._start_munge()
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        (self.root / "spool").mkdir(exist_ok=True)
        self.conf.write_text(self._config())
        start_daemon(["slurmctld", "-f", str(self.conf)], self.env)
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(exist_ok=True)
            start_daemon(["slurmd", "-f", str(self.conf), "-N", node], self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            states = self.scontrol_out(["sinfo", "-h", "-N", "-o", "%N %T"])
            if states.count("idle") == len(self.nodes):
                return self
            time.sleep(0.5)
        raise Unavailable(f"slurm nodes did not become idle: {states!r}; see {self.root}")

    def _start_munge(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create"], check=False, capture_output=True)
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        start_daemon(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
        self.started_munged = True
        deadline = time.time() + 20
        while subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
            if time.time() > deadline:
                raise Unavailable("munged did not start")
            time.sleep(0.2)

    def _config(self) -> str:
        r = self.root
        lines = [
            "ClusterName=spellmtest", "SlurmctldHost=localhost", f"SlurmctldPort={free_port()}", "SlurmUser=root",
            # cred_expire also sets how long a requeued job waits before it starts again (default 120 s)
            "AuthType=auth/munge", "AuthInfo=cred_expire=30", "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "SchedulerParameters=batch_sched_delay=0",
            "SlurmdParameters=config_overrides", "ReturnToService=2", "MpiDefault=none", "JobRequeue=1",
            "KillWait=30", "InactiveLimit=0", "MinJobAge=600",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log", f"SlurmdLogFile={r}/slurmd-%n.log",
        ]
        for node in self.nodes:
            lines.append(f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={free_port()} "
                         "CPUs=2 RealMemory=1000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def scontrol_out(self, command: list[str]) -> str:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=30).stdout

    def submit(self, args: list[str], env: dict[str, str]) -> str:
        result = subprocess.run(["sbatch", "--parsable", *args], env={**env, "SLURM_CONF": str(self.conf)},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        text = self.scontrol_out(["scontrol", "-o", "show", "job", job_id])
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {self.job(job_id)}")

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True, timeout=30)
        time.sleep(1)
        for node in self.nodes:
            stop_pidfile(self.root / f"slurmd-{node}.pid")
        stop_pidfile(self.root / "slurmctld.pid")
        if self.started_munged:
            stop_pidfile(Path("/run/munge/munged.pid"))
