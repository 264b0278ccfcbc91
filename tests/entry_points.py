"""Running an entry point in the test's own process, as ``python -m MODULE ARGS`` would run it."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

from tests.distributed import ROOT, free_port, rank_env

ENTRY_PACKAGES = ("launch.", "analysis.", "bench.")


def run_module(module: str, argv: list[str], monkeypatch, capfd, cwd: Path = ROOT) -> SimpleNamespace:
    """``python -m module *argv`` in this process, as one rank of one (a process group it starts is
    its own to end), from ``cwd``: (returncode, stdout, stderr). Environment, ``sys.argv`` and the
    working directory are restored after it."""
    capfd.readouterr()
    with monkeypatch.context() as patch:
        for name, value in rank_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_PORT=str(free_port())).items():
            patch.setenv(name, value)
        patch.setattr(sys, "argv", [module, *argv])
        patch.chdir(cwd)
        for name in [name for name in sys.modules if name == module or name.startswith(ENTRY_PACKAGES)]:
            patch.delitem(sys.modules, name)  # run afresh as __main__, as `python -m` (or `spellm`) would
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    output = capfd.readouterr()
    return SimpleNamespace(returncode=code, stdout=output.out, stderr=output.err)


def run_script(args: list[str], monkeypatch, capfd, cwd: Path = ROOT) -> SimpleNamespace:
    """:func:`run_module` of a ``python`` command line: ``launch/x.py ARGS`` or ``-m module ARGS``."""
    if args[0] == "-m":
        return run_module(args[1], args[2:], monkeypatch, capfd, cwd)
    return run_module(args[0].removesuffix(".py").replace("/", "."), args[1:], monkeypatch, capfd, cwd)
