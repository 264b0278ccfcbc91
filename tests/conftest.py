"""Test set-up: CPU DeepSpeed, no hub, one thread per process, tiny local tokenizers."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[var] = "1"

import pytest  # noqa: E402

from tests import tiny  # noqa: E402


@pytest.fixture(scope="session")
def byte_level_tokenizer():
    return tiny.byte_level_tokenizer()


@pytest.fixture(scope="session")
def sentencepiece_tokenizer():
    return tiny.sentencepiece_tokenizer()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from spellm_ds import assets

    return assets.load_tokenizer(assets.embedded_model_dir())
