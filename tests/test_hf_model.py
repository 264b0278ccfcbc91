"""An exported model is a transformers model: Auto classes, generate(), forward() logits, pipeline,
remote code, lm_eval's ``hf`` model; on tiny Llama-, GPT-2- and Qwen2-style models (the last with
a vocabulary padded beyond its tokenizer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from spellm_ds.hf import SpeLLMForCausalLM
from spellm_ds.hf.char_decoding import CharDecoder, Provenance, greedy_tokens
from spellm_ds.model.decoding import generate
from spellm_ds.model.spellm import load
from tests import tiny
from tests.distributed import ROOT, rank_env

PROMPTS = ["The river", "In the year 1990 the city of", "A", "He said that the"]
EXPORTED_FILES = {"config.json", "generation_config.json", "model.safetensors", "configuration_spellm.py",
                  "modeling_spellm.py", "char_decoding.py", "char_heads.py", "tokenizer.json"}


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def exported(request, tmp_path_factory):
    """An exported model of each family whose heads decide something (embedding-initialised heads
    with noise) and a fallback threshold at which both the heads and the LM head decide tokens (the
    first quartile of the prompts' head entropies)."""
    root = tmp_path_factory.mktemp(f"hf-{request.param}")
    base_dir = tiny.tiny_model_dir(root / "base", tiny.corpus_texts(60), request.param)
    directory = tiny.spellm_dir(root / "export", base_dir, std=0.4, k=6, trainable_layers=0, readout_width=16)
    model = load(directory)
    tokenizer = model.tokenizer
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        hidden = model.base.get_decoder()(**batch).last_hidden_state
        entropy = model.char_decoder(None).propose(model.char_heads(hidden.flatten(0, 1))).entropy
    tau = entropy.quantile(0.25).item()
    return SimpleNamespace(directory=directory, model=model, batch=batch, tau=tau, family=request.param,
                           base_dir=base_dir)


def hf_new_tokens(model, batch, rows: int, **settings) -> torch.Tensor:
    ids, mask = batch["input_ids"][:rows], batch["attention_mask"][:rows]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0, **settings)
    return out[:, ids.shape[1]:]


def package_new_tokens(model, batch, rows: int, **settings):
    return generate(model, batch["input_ids"][:rows], batch["attention_mask"][:rows], 10, **settings)


def test_the_export_is_a_transformers_model_of_type_spellm(exported):
    files = set(os.listdir(exported.directory))
    assert EXPORTED_FILES <= files
    config = json.loads((exported.directory / "config.json").read_text())
    assert config["model_type"] == "spellm" and config["architectures"] == ["SpeLLMForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "configuration_spellm.SpeLLMConfig",
                                  "AutoModelForCausalLM": "modeling_spellm.SpeLLMForCausalLM"}
    assert config["text_config"]["model_type"] == exported.family and config["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(exported.directory)  # no remote code: spellm_ds is imported
    assert isinstance(model, SpeLLMForCausalLM)
    vocab = model.get_output_embeddings().weight.shape[0]
    assert model.spelling_chars.shape == (vocab, 6) and bool(model.spelling_lengths.gt(0).any())
    assert not model.spelling_lengths[len(exported.model.tokenizer):].any()  # padding rows: no spelling
    bf16 = AutoModelForCausalLM.from_pretrained(exported.directory, dtype=torch.bfloat16)
    assert bf16.char_heads.proj.weight.dtype == torch.bfloat16 and bf16.spelling_chars.dtype == torch.long


@pytest.mark.parametrize("tau_kind", ["never", "quartile"])
@pytest.mark.parametrize("rows", [1, 4])
def test_greedy_generate_is_the_packages_decoder(exported, tau_kind, rows):
    tau = None if tau_kind == "never" else exported.tau
    model = AutoModelForCausalLM.from_pretrained(exported.directory)
    ours = package_new_tokens(exported.model, exported.batch, rows, tau=tau, eos_token_id=None)
    theirs = hf_new_tokens(model, exported.batch, rows, do_sample=False, tau=tau, eos_token_id=None)
    assert torch.equal(theirs, ours.sequences)
    kinds = ours.counts()
    assert kinds["exact"] + kinds["autocorrected"] > 0
    if tau is None:
        assert kinds["fallback"] == 0
    elif rows == 4:
        assert kinds["fallback"] > 0


def test_greedy_generate_follows_rerank_shortlist_and_autocorrect_settings(exported):
    model = AutoModelForCausalLM.from_pretrained(exported.directory)
    eos = exported.model.tokenizer.eos_token_id
    for settings in ({"rerank_k": 4}, {"autocorrect": False, "eos_token_id": eos}, {"shortlist": 20},
                     {"shortlist": 20, "rerank_k": 3}):
        ours = package_new_tokens(exported.model, exported.batch, 4, tau=exported.tau, **settings)
        theirs = hf_new_tokens(model, exported.batch, 4, do_sample=False, tau=exported.tau, **settings)
        assert torch.equal(theirs[:, : ours.sequences.shape[1]], ours.sequences), settings
    for settings in ({"rerank_k": 4}, {"shortlist": 20}):
        out = package_new_tokens(exported.model, exported.batch, 4, tau=None, eos_token_id=None, **settings)
        assert (out.provenance == Provenance.RERANKED).any(), settings
    with pytest.raises(ValueError, match="greedy"):
        model.generate(**exported.batch, do_sample=True, rerank_k=4)
    for generate_with in (model.generate, lambda **kw: package_new_tokens(exported.model, exported.batch, 4, **kw)):
        with pytest.raises(ValueError, match="shortlist"):
            generate_with(autocorrect=False, eos_token_id=eos, shortlist=20)


def test_greedy_generate_scores_every_spelling_only_where_something_reads_them(exported, monkeypatch):
    """With no logits processor and no scores returned, greedy generate() picks tokens as the
    package's loop does, without the full distribution; asked for scores, or with a processor, it
    computes the distribution, and the tokens are the same."""
    model = AutoModelForCausalLM.from_pretrained(exported.directory)
    computed = []
    mixture = CharDecoder.mixture_log_probs
    monkeypatch.setattr(CharDecoder, "mixture_log_probs", lambda *a, **k: computed.append(1) or mixture(*a, **k))
    settings = dict(do_sample=False, tau=exported.tau, eos_token_id=None)
    fast = hf_new_tokens(model, exported.batch, 4, **settings)
    assert not computed
    scored = model.generate(**exported.batch, max_new_tokens=10, pad_token_id=0, return_dict_in_generate=True,
                            output_scores=True, **settings)
    assert len(computed) == 10 and torch.equal(scored.sequences[:, exported.batch["input_ids"].shape[1]:], fast)
    assert all(bool(torch.isfinite(step).sum(-1).gt(1).all()) for step in scored.scores)  # distributions, not one-hots
    class Unchanged(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores

    processed = hf_new_tokens(model, exported.batch, 4, logits_processor=LogitsProcessorList([Unchanged()]), **settings)
    assert len(computed) == 20 and torch.equal(processed, fast)


@pytest.mark.parametrize("settings", [{"rerank_k": 0}, {"rerank_k": 4}, {"autocorrect": False}, {"shortlist": 20},
                                      {"shortlist": 20, "rerank_k": 3}])
def test_greedy_picks_read_from_the_mixture_are_the_ones_computed_afresh(exported, settings):
    """generate()'s greedy step reuses mixture_log_probs' AutoCorrect, rerank and LM-head rows: the
    tokens and provenance must be those greedy_tokens computes on its own."""
    model = AutoModelForCausalLM.from_pretrained(exported.directory)
    torch.manual_seed(0)
    hidden = torch.randn(16, model.config.get_text_config().hidden_size) * 4
    decoder, lm_head = model.char_decoder(exported.tau, settings.get("shortlist", 0)), model.get_output_embeddings()
    char_logits = model.char_heads(hidden)
    rerank_k, autocorrect, eos = settings.get("rerank_k", 0), settings.get("autocorrect", True), 7
    mixed, mixture_proposal, fallback_logits = decoder.mixture_log_probs(char_logits, hidden, lm_head, rerank_k)
    plain = decoder.propose(char_logits, autocorrect=False)
    masks = plain.fallback, plain.hit
    afresh = greedy_tokens(decoder, char_logits, hidden, lm_head, plain, *masks, rerank_k, autocorrect, eos)
    reused = greedy_tokens(decoder, char_logits, hidden, lm_head, mixture_proposal, *masks, rerank_k, autocorrect,
                           eos, fallback_logits)
    assert torch.equal(reused[0], afresh[0]) and torch.equal(reused[1], afresh[1])
    assert 0 < int(plain.fallback.sum()) < len(hidden) and bool((~plain.hit & ~plain.fallback).any())


@pytest.mark.parametrize("shortlist", [0, 20])
def test_sampled_generate_is_the_packages_sampling(exported, shortlist):
    model = AutoModelForCausalLM.from_pretrained(exported.directory)
    settings = {"temperature": 0.8, "top_k": 30, "top_p": 0.9, "shortlist": shortlist}
    torch.manual_seed(7)
    ours = package_new_tokens(exported.model, exported.batch, 4, tau=exported.tau, eos_token_id=None, do_sample=True,
                              **settings)
    torch.manual_seed(7)
    theirs = hf_new_tokens(model, exported.batch, 4, do_sample=True, tau=exported.tau, eos_token_id=None, **settings)
    assert torch.equal(theirs, ours.sequences)
    torch.manual_seed(8)
    assert not torch.equal(hf_new_tokens(model, exported.batch, 4, do_sample=True, tau=exported.tau,
                                         eos_token_id=None, **settings), theirs)


def test_forward_logits_are_the_packages_log_probabilities(exported):
    """forward() against the package's own per-token scoring (the lm_eval ``spellm`` model's): the
    char heads' distribution where they decide, the LM head's where the position falls back."""
    from spellm_ds.eval.lm_eval_model import SpeLLMEvalModel

    model = AutoModelForCausalLM.from_pretrained(exported.directory)
    model.config.tau = exported.tau
    lm = SpeLLMEvalModel(str(exported.directory), tau=exported.tau, batch_size=4)
    text = exported.model.tokenizer(" ".join(tiny.corpus_texts(70)[60:62]))["input_ids"][:40]
    ids = torch.tensor([text])
    with torch.no_grad():
        out = model(ids, labels=ids)
    logits = out.logits[0].float()
    assert torch.allclose(logits.logsumexp(-1), torch.zeros(len(text)), atol=1e-4)  # log-probabilities
    assert torch.allclose(torch.log_softmax(logits, -1), logits, atol=1e-4)
    scores = lm.continuation_log_probs([(text[:cut], text[cut:cut + 1]) for cut in range(1, len(text))])
    for cut, (score, _) in zip(range(1, len(text)), scores):  # every position, one batch
        assert logits[cut - 1, text[cut]].item() == pytest.approx(score, abs=1e-4)
    targets = ids[0, 1:]
    nll = -logits[:-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    finite = torch.isfinite(nll)
    assert finite.any() and lm.fallback_positions > 0
    if finite.all():
        assert out.loss.item() == pytest.approx(nll.mean().item(), rel=1e-4)
    else:  # a token the heads cannot spell, at a position they decide: probability 0
        assert out.loss.item() == float("inf")


@pytest.mark.parametrize("settings", [{"rerank_k": 4}, {"shortlist": 20}])
def test_forward_follows_rerank_k_and_shortlist_from_the_config(exported, settings):
    from spellm_ds.eval.lm_eval_model import SpeLLMEvalModel

    model = AutoModelForCausalLM.from_pretrained(exported.directory)
    model.config.tau = exported.tau
    text = exported.model.tokenizer(tiny.corpus_texts(70)[63])["input_ids"][:24]
    with torch.no_grad():
        plain = model(torch.tensor([text])).logits[0]
        for name, value in settings.items():
            setattr(model.config, name, value)
        logits = model(torch.tensor([text])).logits[0]
    assert not torch.allclose(logits, plain)
    lm = SpeLLMEvalModel(str(exported.directory), tau=exported.tau, batch_size=4, **settings)
    for cut in (4, 12, 23):
        (score, _), = lm.continuation_log_probs([(text[:cut], text[cut:cut + 1])])
        assert logits[cut - 1, text[cut]].item() == pytest.approx(score, abs=1e-4)


def test_a_shortlist_needs_the_token_counts_an_export_records(exported, tmp_path):
    """An export records its training text's token counts (the shortlist's ranking); one made before
    they were (no such tensor) still loads, and refuses a shortlist with the fix, in transformers
    and in the package's commands."""
    import shutil

    from safetensors.torch import load_file, save_file

    from spellm_ds.errors import SpellmError

    model = AutoModelForCausalLM.from_pretrained(exported.directory)
    assert int(model.token_counts.sum()) > 0 and not model.token_counts[len(exported.model.tokenizer):].any()
    shutil.copytree(exported.directory, tmp_path / "bare")
    tensors = load_file(tmp_path / "bare" / "model.safetensors")
    del tensors["token_counts"]
    save_file(tensors, tmp_path / "bare" / "model.safetensors", metadata={"format": "pt"})
    without = AutoModelForCausalLM.from_pretrained(tmp_path / "bare")
    assert not without.token_counts.any() and not load(tmp_path / "bare").token_counts.any()
    assert without.generate(**exported.batch, max_new_tokens=2, pad_token_id=0).shape[1] > 0  # no shortlist: fine
    with pytest.raises(ValueError, match="no token counts.*re-export"):
        without.generate(**exported.batch, max_new_tokens=2, pad_token_id=0, shortlist=5)
    with pytest.raises(SpellmError, match="records no token counts.*launch/export.py"):
        load(tmp_path / "bare", shortlist=5)


@pytest.mark.processes
def test_pipeline_and_remote_code_without_the_package(exported, tmp_path):
    """In a process that cannot import spellm_ds: the Auto classes refuse without trust_remote_code,
    load the shipped code with it, and its greedy generate() gives the package's tokens."""
    expected = package_new_tokens(exported.model, exported.batch, 4, tau=exported.tau, eos_token_id=None)
    prompts = json.dumps(PROMPTS)
    script = f"""
import json, sys, torch
sys.modules["spellm_ds"] = None  # not installed here
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
directory = {str(exported.directory)!r}
try:
    AutoModelForCausalLM.from_pretrained(directory)
    print("LOADED WITHOUT TRUST")
except ValueError as error:
    print("REFUSED", "trust_remote_code" in str(error))
model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
print("MODULE", type(model).__module__)
tokenizer = AutoTokenizer.from_pretrained(directory)
tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
batch = tokenizer(json.loads({prompts!r}), return_tensors="pt", padding=True, padding_side="left")
out = model.generate(**batch, max_new_tokens=10, do_sample=False, tau={exported.tau!r}, eos_token_id=None,
                     pad_token_id=0)
print("TOKENS", json.dumps(out[:, batch["input_ids"].shape[1]:].tolist()))
text = pipeline("text-generation", model=directory, trust_remote_code=True)("The river", max_new_tokens=4,
                                                                              do_sample=False)
print("PIPELINE", json.dumps(text))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={**rank_env(), "PYTHONPATH": ""}, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    # (transformers' trust prompt may share a line with what follows it)
    lines = {key: line.split(f"{key} ", 1)[1] for line in result.stdout.splitlines()
             for key in ("REFUSED", "MODULE", "TOKENS", "PIPELINE") if f"{key} " in line}
    assert lines["REFUSED"] == "True"
    assert lines["MODULE"].startswith("transformers_modules.")
    assert json.loads(lines["TOKENS"]) == expected.sequences.tolist()
    assert json.loads(lines["PIPELINE"])[0]["generated_text"].startswith("The river")


def test_the_base_architecture_does_not_load_the_export_silently(exported):
    """Loaded as its base class, the export gives none of its weights to the base model (its names
    are SpeLLM's), so it cannot pass for the base model: transformers reports every weight missing."""
    base_class = type(exported.model.base)
    wrong = base_class.from_pretrained(exported.directory)
    right = exported.model.base
    assert not torch.equal(wrong.get_input_embeddings().weight, right.get_input_embeddings().weight)


def test_lm_eval_hf_scores_the_export_as_the_spellm_model(exported):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from spellm_ds.eval.lm_eval_model import SpeLLMEvalModel

    config = json.loads((exported.directory / "config.json").read_text())
    config["tau"] = exported.tau
    (exported.directory / "config.json").write_text(json.dumps(config))
    texts = tiny.corpus_texts(70)[64:67]
    requests = [Instance("loglikelihood", {}, (text[:40], text[40:60]), idx) for idx, text in enumerate(texts)]
    hf = HFLM(pretrained=str(exported.directory), trust_remote_code=True, batch_size=2, device="cpu",
              dtype="float32").loglikelihood(requests)
    ours = SpeLLMEvalModel(str(exported.directory), tau=exported.tau, batch_size=2).loglikelihood(requests)
    for (hf_score, _), (our_score, _) in zip(hf, ours):
        assert hf_score == pytest.approx(our_score, abs=1e-3) or hf_score == our_score == float("-inf")


@pytest.mark.processes
def test_the_inference_path_imports_no_deepspeed_and_sets_no_offline_mode():
    script = """
import os, sys
os.environ.pop("HF_HUB_OFFLINE", None)
import spellm_ds, spellm_ds.model.spellm, spellm_ds.model.decoding, spellm_ds.eval.lm_eval_model, analysis.report
print("deepspeed" in sys.modules, os.environ.get("HF_HUB_OFFLINE"))
"""
    env = {key: value for key, value in rank_env().items() if key != "HF_HUB_OFFLINE"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "None"]


def test_a_hub_id_resolves_from_the_local_hugging_face_cache(tmp_path, monkeypatch):
    """``--model org/name`` through a Hugging Face cache the test fills (offline: the cache alone)."""
    import shutil

    from huggingface_hub import constants

    from spellm_ds.data import assets
    from spellm_ds.errors import SpellmError

    base_dir = tiny.tiny_llama_dir(tmp_path / "base", tiny.corpus_texts(20))
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(base_dir, snapshot)
    (cache / "models--someone--tiny-llama" / "refs").mkdir()
    (cache / "models--someone--tiny-llama" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    resolved = assets.resolve_model("someone/tiny-llama")
    assert resolved == snapshot and (resolved / "config.json").is_file()
    with pytest.raises(SpellmError, match="not in the local Hugging Face cache"):
        assets.resolve_model("someone/not-there")


def test_an_export_of_only_what_changed_loads_as_the_whole_model(exported, tmp_path):
    """``changed_only`` stores the tensors that differ from the base model's files (here the heads,
    the spellings and one edited FFN weight); loading assembles the same model, checks the base
    files' sha256, and names the fix when the base model has moved or changed."""
    import shutil

    from safetensors.torch import load_file

    from spellm_ds.model.spellm import save_export

    model = load(exported.directory)
    edited = next(name for name, _ in model.named_parameters() if name.startswith("base.") and ".mlp." in name)
    with torch.no_grad():
        model.get_parameter(edited).add_(0.01)
    save_export(model, tmp_path / "whole", model.tokenizer, exported.base_dir)
    base_dir = tmp_path / "base"
    shutil.copytree(exported.base_dir, base_dir)
    save_export(model, tmp_path / "changed", model.tokenizer, base_dir, changed_only=True)
    stored = load_file(tmp_path / "changed" / "model.safetensors")
    assert {name for name in stored if name.startswith("base.")} == {edited}
    assert {name.split(".")[0] for name in stored} == {"base", "char_heads", "spelling_chars", "spelling_lengths",
                                                       "token_counts"}
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "whole")
    assembled = AutoModelForCausalLM.from_pretrained(tmp_path / "changed")
    assert isinstance(assembled, SpeLLMForCausalLM) and assembled.config.base_weights["path"] == str(base_dir)
    expected, got = whole.state_dict(), assembled.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[n], got[n]) for n in expected)
    assert torch.equal(hf_new_tokens(assembled, exported.batch, 4, do_sample=False, tau=exported.tau),
                       hf_new_tokens(whole, exported.batch, 4, do_sample=False, tau=exported.tau))
    moved = tmp_path / "moved"
    base_dir.rename(moved)
    with pytest.raises(ValueError, match="is not at .*; pass base_model_path=DIR"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "changed")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "changed", base_model_path=str(moved))
    assert torch.equal(again.get_parameter(edited), whole.get_parameter(edited))
    weights = moved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is not the one this SpeLLM export was made from \\(model.safetensors "
                                         "differs\\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "changed", base_model_path=str(moved))
