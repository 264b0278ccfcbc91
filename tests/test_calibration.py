"""The spelling temperature: its fit, its record in the model directory and its use when scoring."""

import json
import subprocess
import sys

import pytest
import torch

from spellm_ds.data.assets import load_tokenizer
from spellm_ds.data.packing import load_texts, pack
from spellm_ds.export.calibration import CALIBRATION_FILE, TEMPERATURES, calibrate, fit_spelling_temperature
from spellm_ds.hf.char_decoding import CharDecoder
from spellm_ds.model.spellm import load, spellm_outputs
from tests import tiny
from tests.distributed import ROOT, rank_env


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def overconfident(request, tmp_path_factory):
    """A tiny SpeLLM model of each family whose heads are far too sure (large random weights),
    saved as a directory, and held-out blocks of text it never saw."""
    texts = tiny.corpus_texts(120)
    root = tmp_path_factory.mktemp(f"calibration-{request.param}")
    base_dir = tiny.tiny_model_dir(root / "base", texts[:80], family=request.param)
    tiny.spellm_dir(root / "model", base_dir, std=4.0, k=6)
    return root / "model", pack(texts[80:], load_tokenizer(base_dir), 32, max_blocks=6)


def test_the_fit_is_the_grid_minimum_of_the_held_out_nll(overconfident):
    model_dir, blocks = overconfident
    model = load(model_dir)
    found = fit_spelling_temperature(model, blocks, batch_size=4)  # two batches, the second partial

    with torch.no_grad():
        char_logits = spellm_outputs(model, blocks).char_logits[:, :-1].flatten(0, 1)
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
    model = load(model_dir)
    assert model.config.spelling_temperature == found.temperature
    assert model.char_decoder().temperature == found.temperature
    assert calibrate(model_dir, blocks).temperature == found.temperature  # a refit ignores the recorded T


@pytest.mark.processes
def test_the_calibrate_command_fits_a_model_on_the_text_given(overconfident, tmp_path):
    model_dir, _ = overconfident
    texts = tiny.corpus_texts(120)[80:]
    data = tmp_path / "held_out.txt"
    data.write_text("\n\n".join(texts))
    config = json.loads((model_dir / "config.json").read_text())
    config["spelling_temperature"] = 1.0  # as if fitted on no text
    (model_dir / "config.json").write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "launch/calibrate.py", "--model", str(model_dir), "--data", str(data),
                             "--max_tokens", "512"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=rank_env())
    assert result.returncode == 0, result.stderr
    model = load(model_dir)
    blocks = pack(load_texts([str(data)])["text"], model.tokenizer, 256, max_blocks=2)  # 512 tokens
    expected = fit_spelling_temperature(model, blocks)
    assert f"spelling temperature {expected.temperature} " in result.stdout
    assert load(model_dir).config.spelling_temperature == expected.temperature > 1.5
