"""Calibration of the char heads' token distribution: its fit, its record in the model directory
and its use when scoring."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from spellm_ds.assets import load_tokenizer
from spellm_ds.calibration import CALIBRATION_FILE, TEMPERATURES, UNIGRAM_WEIGHTS, calibrate, fit, token_counts
from spellm_ds.charset import Charset
from spellm_ds.data import load_texts, pack, split_documents
from spellm_ds.decoding import CharDecoder
from spellm_ds.errors import SpellmError
from spellm_ds.model import UNIGRAM_FILE, SpeLLMConfig, SpeLLMForCausalLM
from tests import tiny
from tests.distributed import ROOT, rank_env


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def overconfident(request, tmp_path_factory):
    """A tiny SpeLLM model of each family whose heads are far too sure (large random weights),
    saved as a directory; its training blocks and held-out blocks of text it never saw."""
    texts = tiny.corpus_texts(120)
    root = tmp_path_factory.mktemp(f"calibration-{request.param}")
    base_dir = tiny.tiny_model_dir(root / "base", texts[:80], family=request.param)
    model = SpeLLMForCausalLM(AutoModelForCausalLM.from_pretrained(base_dir), SpeLLMConfig(k=6), Charset.default())
    torch.manual_seed(0)
    torch.nn.init.normal_(model.char_heads.proj.weight, std=4.0)
    tokenizer = load_tokenizer(base_dir)
    model.attach_tokenizer(tokenizer)
    model.save_pretrained(root / "model", tokenizer)
    return root / "model", pack(texts[:80], tokenizer, 32), pack(texts[80:], tokenizer, 32, max_blocks=6)


def test_the_fit_is_the_grid_minimum_of_the_held_out_nll(overconfident):
    model_dir, training, blocks = overconfident
    model = SpeLLMForCausalLM.from_pretrained(model_dir)
    counts = token_counts(training, model.spelling.vocab_size)
    found = fit(model, blocks, counts, batch_size=4)  # two batches, the second partial

    with torch.no_grad():
        char_logits = model(input_ids=blocks).char_logits[:, :-1].flatten(0, 1)
    targets = blocks[:, 1:].flatten()
    spellable = model.spelling.spellable[targets]
    assert found.positions == int(spellable.sum()) > 100

    def nll(temperature: float, weight: float) -> float:
        decoder = CharDecoder(model.spelling, None, temperature, weight, counts)
        return float(-decoder.spelling_log_probs(char_logits[spellable], targets[spellable]).double().mean())

    corners = [(t, w) for t in (TEMPERATURES[0], TEMPERATURES[-1]) for w in (UNIGRAM_WEIGHTS[0], UNIGRAM_WEIGHTS[-1])]
    for temperature, weight in [(1.0, 0.0), (found.temperature, found.unigram_weight), *corners]:
        assert found.nll_at(temperature, weight) == pytest.approx(nll(temperature, weight), rel=1e-5)
    best = found.nll_at(found.temperature, found.unigram_weight)
    assert best == min(v for curve in found.nll.values() for v in curve.values())
    assert best < found.nll_at(1.0, 0.0) - 0.5
    # both numbers earn their place: the unigram beats the best temperature alone, and T != 1
    assert found.unigram_weight > 0 and best < min(found.nll["0.0"].values())
    assert found.temperature != 1.0


def test_calibrate_records_the_fit_that_scoring_then_uses(overconfident):
    model_dir, training, blocks = overconfident
    found = calibrate(model_dir, blocks, training)
    assert json.loads((model_dir / CALIBRATION_FILE).read_text())["unigram_weight"] == found.unigram_weight
    model = SpeLLMForCausalLM.from_pretrained(model_dir)
    assert torch.equal(load_file(model_dir / UNIGRAM_FILE)["token_counts"],
                       token_counts(training, model.spelling.vocab_size))
    assert (model.config.spelling_temperature, model.config.unigram_weight) == (found.temperature,
                                                                                found.unigram_weight)
    decoder = model.char_decoder()
    assert (decoder.temperature, decoder.unigram_weight) == (found.temperature, found.unigram_weight)
    assert torch.equal(decoder.unigram, CharDecoder(model.spelling, token_counts=model.token_counts).unigram)
    refit = calibrate(model_dir, blocks, training)  # a refit ignores what is recorded
    assert (refit.temperature, refit.unigram_weight) == (found.temperature, found.unigram_weight)


def test_the_calibrate_command_fits_a_model_on_the_text_given(overconfident, tmp_path):
    model_dir, _, _ = overconfident
    texts = tiny.corpus_texts(120)
    training_data, held_out_data = tmp_path / "training.txt", tmp_path / "held_out.txt"
    training_data.write_text("\n\n".join(texts[:80]))
    held_out_data.write_text("\n\n".join(texts[80:]))
    config = json.loads((model_dir / "spellm_config.json").read_text())
    config.update(spelling_temperature=1.0, unigram_weight=0.0)  # as exported before export fitted them
    (model_dir / "spellm_config.json").write_text(json.dumps(config))
    (model_dir / UNIGRAM_FILE).unlink(missing_ok=True)
    result = subprocess.run([sys.executable, "launch/calibrate.py", "--model", str(model_dir),
                             "--training_data", str(training_data), "--data", str(held_out_data),
                             "--max_tokens", "512"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=rank_env())
    assert result.returncode == 0, result.stderr
    model = SpeLLMForCausalLM.from_pretrained(model_dir)
    # as distill splits --data: the unigram is counted on its training documents
    training, _ = split_documents(load_texts([str(training_data)])["text"], 0.02, 0)
    counts = token_counts(pack(training, model.tokenizer, 256), model.spelling.vocab_size)
    assert torch.equal(model.token_counts, counts)
    blocks = pack(load_texts([str(held_out_data)])["text"], model.tokenizer, 256, max_blocks=2)  # 512 tokens
    expected = fit(model, blocks, counts)
    assert f"spelling temperature {expected.temperature}, unigram weight {expected.unigram_weight} " in result.stdout
    assert (model.config.spelling_temperature, model.config.unigram_weight) == (expected.temperature,
                                                                                expected.unigram_weight)
    assert expected.unigram_weight > 0


def test_a_model_with_a_unigram_weight_but_no_counts_says_so(overconfident, tmp_path):
    model_dir, training, blocks = overconfident
    calibrate(model_dir, blocks, training)
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    (copy / UNIGRAM_FILE).unlink()
    with pytest.raises(SpellmError, match=f"{copy} has a unigram weight but no {UNIGRAM_FILE}; restore it"):
        SpeLLMForCausalLM.from_pretrained(copy)
