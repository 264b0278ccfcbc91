"""The spelling temperature: its fit, its record in the model directory and its use when scoring."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from spellm_ds.assets import load_tokenizer
from spellm_ds.calibration import CALIBRATION_FILE, TEMPERATURES, calibrate, fit_spelling_temperature
from spellm_ds.charset import Charset
from spellm_ds.data import pack
from spellm_ds.decoding import CharDecoder
from spellm_ds.model import SpeLLMConfig, SpeLLMForCausalLM
from tests import tiny


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def overconfident(request, tmp_path_factory):
    """A tiny SpeLLM model of each family whose heads are far too sure (large random weights),
    saved as a directory, and held-out blocks of text it never saw."""
    texts = tiny.corpus_texts(120)
    root = tmp_path_factory.mktemp(f"calibration-{request.param}")
    base_dir = tiny.tiny_model_dir(root / "base", texts[:80], family=request.param)
    model = SpeLLMForCausalLM(AutoModelForCausalLM.from_pretrained(base_dir), SpeLLMConfig(k=6), Charset.default())
    torch.manual_seed(0)
    torch.nn.init.normal_(model.char_heads.proj.weight, std=4.0)
    tokenizer = load_tokenizer(base_dir)
    model.attach_tokenizer(tokenizer)
    model.save_pretrained(root / "model", tokenizer)
    return root / "model", pack(texts[80:], tokenizer, 32, max_blocks=6)


def test_the_fit_is_the_grid_minimum_of_the_held_out_nll(overconfident):
    model_dir, blocks = overconfident
    model = SpeLLMForCausalLM.from_pretrained(model_dir)
    found = fit_spelling_temperature(model, blocks, batch_size=4)  # two batches, the second partial

    with torch.no_grad():
        char_logits = model(input_ids=blocks).char_logits[:, :-1].flatten(0, 1)
    targets = blocks[:, 1:].flatten()
    spellable = model.spelling.spellable[targets]
    assert found.positions == int(spellable.sum()) > 100

    def nll(temperature: float) -> float:
        decoder = CharDecoder(model.spelling, None, temperature)
        return float(-decoder.spelling_log_probs(char_logits[spellable], targets[spellable]).double().mean())

    for temperature in (1.0, found.temperature, TEMPERATURES[0], TEMPERATURES[-1]):
        assert found.nll[str(temperature)] == pytest.approx(nll(temperature), rel=1e-5)
    assert found.nll[str(found.temperature)] == min(found.nll.values())
    assert found.temperature > 1.5  # the overconfident heads are spread
    assert found.nll[str(found.temperature)] < found.nll["1.0"] - 0.5


def test_calibrate_records_the_temperature_that_scoring_then_uses(overconfident):
    model_dir, blocks = overconfident
    found = calibrate(model_dir, blocks)
    assert json.loads((model_dir / CALIBRATION_FILE).read_text())["temperature"] == found.temperature
    model = SpeLLMForCausalLM.from_pretrained(model_dir)
    assert model.config.spelling_temperature == found.temperature
    assert model.char_decoder().temperature == found.temperature
    assert calibrate(model_dir, blocks).temperature == found.temperature  # refitting reads the heads as trained
