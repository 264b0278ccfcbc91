"""Test set-up: CPU DeepSpeed, no hub, one thread per process, tiny local tokenizers."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[var] = "1"

import subprocess  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests import tiny  # noqa: E402

LAUNCHERS = ("python", "deepspeed", "torchrun", "mpirun", "srun", "sbatch", "salloc", "spellm")


@contextmanager
def launches_refused(item: pytest.Item):
    """Fail a test (fixtures included) that starts Python or a launcher without carrying
    ``@pytest.mark.processes``: the fast tier (``make test-fast``) leaves those out, and this keeps
    the marks true."""
    if item.get_closest_marker("processes"):
        yield
        return
    real_init = subprocess.Popen.__init__

    def checked_init(self, args, *rest, **kwargs):
        program = Path(str(args if isinstance(args, (str, Path)) else args[0]).split()[0]).name
        if program.startswith(LAUNCHERS):
            raise AssertionError(f"{item.nodeid} starts {program}: mark it @pytest.mark.processes")
        real_init(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = checked_init
    try:
        yield
    finally:
        subprocess.Popen.__init__ = real_init


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with launches_refused(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with launches_refused(item):
        return (yield)


@pytest.fixture(scope="session")
def byte_level_tokenizer():
    return tiny.byte_level_tokenizer()


@pytest.fixture(scope="session")
def sentencepiece_tokenizer():
    return tiny.sentencepiece_tokenizer()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from spellm_ds.data import assets

    return assets.load_tokenizer(assets.embedded_model_dir())
