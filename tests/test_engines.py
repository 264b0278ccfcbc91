"""In-process, world-size-1 ZeRO-3 checks of the two engines (fast; no launcher)."""

import json
import math
import os

import deepspeed
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from spellm_ds.data.packing import step_rows
from spellm_ds.distill import teacher as teacher_module
from spellm_ds.distill.config import RunConfig
from spellm_ds.distill.losses import distillation_loss
from spellm_ds.distill.teacher import ANCHOR_SHIFT, StateAnchors, noised_states, teacher_signal, top_tokens_from_hidden
from spellm_ds.distill.train import Distillation
from spellm_ds.errors import SpellmError
from spellm_ds.export import export
from spellm_ds.model.spellm import Student, decoder_layers, load, spellm_outputs
from spellm_ds.runtime import distributed
from tests import tiny
from tests.distributed import free_port


def gathered(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone() for name, p in params.items()}


def whole_student(run: Distillation) -> Student:
    """The student as one unsharded model that runs from ``input_ids``: the base model with the
    engine's weights on top (the lower layers the engine let go of are the base model's)."""
    base = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=torch.float32)
    model = Student(base, run.config.spellm_config(base.config, run.charset))
    _, unexpected = model.load_state_dict(gathered(run.student.module), strict=False)
    assert not unexpected
    return model.eval()


@pytest.fixture(scope="module")
def process_group():
    """A world-size-1 process group for in-process engines; restores the environment after."""
    saved_env = dict(os.environ)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    distributed.init(60)
    yield
    distributed.teardown()
    os.environ.clear()  # later tests launch their own ranks: leave no rank variables behind
    os.environ.update(saved_env)


def tiny_distillation(root, family: str = "llama", persistence: int | str = 0, **overrides) -> Distillation:
    """A tiny fp32 run whose teacher and student share one config; persistence 0 (fully sharded)
    by default, so partitioning is tested."""
    model_dir, data = tiny.tiny_setup(root, n_texts=120, family=family)
    ds = json.loads(open("ds_configs/zero3.json").read())
    ds["bf16"] = {"enabled": False}  # fp32 so the export can be compared exactly
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = persistence
    (root / "zero3_fp32.json").write_text(json.dumps(ds))
    settings = dict(model=str(model_dir), data=[str(data)], output_dir=str(root / "out"),
                    deepspeed=str(root / "zero3_fp32.json"), teacher_deepspeed=str(root / "zero3_fp32.json"),
                    k=6, trainable_layers=2, readout_width=0, seq_len=32, micro_batch=2, max_steps=4, lr=1e-2,
                    warmup=1, eval_blocks=4, save_every=0)  # the paper's recipe; the default's is tested below
    config = RunConfig(**{**settings, **overrides})
    config.validate()
    return Distillation(config)


@pytest.fixture(scope="module")
def distillation(process_group, tmp_path_factory):
    return tiny_distillation(tmp_path_factory.mktemp("engines"))


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_every_family_distils_under_zero3_with_a_shared_trunk(process_group, tmp_path, family):
    """GPT-2 (learned positions) and Qwen2 (padded vocab, untied head, sliding window): embedding
    head init over the model's whole vocabulary, trunk equivalence under ZeRO-3, falling loss."""
    run = tiny_distillation(tmp_path, family, max_steps=12)
    assert run.table.vocab_size == run.teacher.module.config.vocab_size
    ids = run.data.held_out[:2]
    run.student.eval()
    with torch.no_grad():
        naive = whole_student(run)(ids)
        _, trunk = teacher_signal(run.teacher.module, ids, trunk_layer=run.trunk_layer)
        shared = run.student(trunk_hidden=trunk)
    run.student.train()
    assert torch.allclose(shared.char_logits, naive.char_logits, atol=1e-5)
    student = run.student.module.base  # no token embedding; the LM head for the token regulariser (tied or not)
    assert not list(student.get_input_embeddings().parameters()) and list(student.get_output_embeddings().parameters())
    losses = [run.train_step(step)["loss/total"] for step in range(12)]
    assert all(math.isfinite(loss) for loss in losses) and sum(losses[-3:]) < 0.9 * sum(losses[:3])


def test_both_engines_are_zero3_partitioned(distillation):
    for engine in (distillation.teacher, distillation.student):
        assert engine.zero_optimization_stage() == 3
        params = list(engine.module.parameters())
        assert all(hasattr(p, "ds_id") and p.ds_numel > 0 for p in params)
        assert all(p.numel() == 0 for p in params if p.ds_numel > 10000)  # released partitions


def test_shared_trunk_equals_the_naive_two_model_computation(distillation):
    ids = distillation.data.train[:2]
    assert distillation.trunk_layer == 2  # 4 layers, 2 trainable
    distillation.student.eval()
    with torch.no_grad():
        naive_signal, _ = teacher_signal(distillation.teacher.module, ids)
        naive = whole_student(distillation)(ids, with_token_logits=True)
        signal, trunk = teacher_signal(distillation.teacher.module, ids, trunk_layer=distillation.trunk_layer)
        shared = distillation.student(trunk_hidden=trunk, with_token_logits=True)
    distillation.student.train()
    assert torch.equal(signal.top_ids, naive_signal.top_ids)
    assert torch.allclose(shared.char_logits, naive.char_logits, atol=1e-5)
    assert torch.allclose(shared.token_logits, naive.token_logits, atol=1e-5)


def test_the_student_holds_no_layer_the_teacher_runs(distillation):
    """With the shared trunk the student engine lets go of the frozen layers below it and of the
    token embedding (ZeRO-3 would manage them every step for nothing); the tied LM head stays for
    the token regulariser. Run without the trunk it says so."""
    student, teacher = distillation.student.module, distillation.teacher.module
    layers = decoder_layers(student.base)
    assert [sum(1 for _ in layer.parameters()) > 0 for layer in layers] == [False, False, True, True]
    assert not list(student.base.get_input_embeddings().parameters())
    held = sum(p.ds_numel for p in student.base.parameters())
    below = sum(p.ds_numel for layer in list(decoder_layers(teacher))[:2] for p in layer.parameters())
    assert held == sum(p.ds_numel for p in teacher.parameters()) - below  # the tied embedding is the LM head
    with pytest.raises(SpellmError, match="part of the student was dropped"), torch.no_grad():
        distillation.student(distillation.data.train[:1])


def test_without_the_shared_trunk_the_student_keeps_and_runs_every_layer(process_group, tmp_path):
    """--no-shared_trunk: the student holds all its layers, runs from input_ids and trains."""
    run = tiny_distillation(tmp_path, shared_trunk=False, max_steps=2)
    assert run.trunk_layer is None
    assert all(sum(1 for _ in layer.parameters()) > 0 for layer in decoder_layers(run.student.module.base))
    ids = run.data.held_out[:2]
    run.student.eval()
    with torch.no_grad():
        assert torch.allclose(run.student(ids).char_logits, whole_student(run)(ids).char_logits, atol=1e-5)
    run.student.train()
    assert all(math.isfinite(run.train_step(step)["loss/total"]) for step in range(2))


def test_teacher_never_changes_and_export_reproduces_the_student(distillation, tmp_path):
    before = gathered(distillation.teacher.module)
    student_before = gathered(distillation.student.module)
    for step in range(3):
        distillation.train_step(step)
    after = gathered(distillation.teacher.module)
    assert all(torch.equal(before[n], after[n]) for n in before)
    student_after = gathered(distillation.student.module)
    moved = {n for n in student_before if not torch.equal(student_before[n], student_after[n])}
    assert moved == set(distillation.student.module.trainable_parameter_names())

    saved = distillation.save(3)
    exported = export.export(saved, tmp_path / "model")
    base = load_file(distillation.model_dir / "model.safetensors")
    written = load_file(exported / "model.safetensors")
    for name in base:
        trained = student_after.get("base." + name)
        if "base." + name in moved:
            assert torch.equal(written["base." + name], trained), name  # fp32 run: master == model weight
        else:
            assert torch.equal(written["base." + name], base[name]), name
    ids = distillation.data.held_out[:2, :16]
    distillation.student.eval()
    with torch.no_grad():
        _, trunk = teacher_signal(distillation.teacher.module, ids, trunk_layer=distillation.trunk_layer)
        expected = distillation.student(trunk_hidden=trunk).char_logits
    reloaded = load(exported)
    with torch.no_grad():
        assert torch.allclose(spellm_outputs(reloaded, ids).char_logits, expected, atol=1e-5)
    # the spelling temperature is fitted on the run's own evaluation blocks, and recorded
    blocks = export.run_blocks(distillation.config, reloaded.tokenizer)
    assert torch.equal(blocks.held_out, distillation.data.held_out)
    # the shortlist ranks by the training text's counts, which every rank computed the same way
    assert torch.equal(reloaded.token_counts, distillation.token_counts.cpu())
    assert int(reloaded.token_counts.sum()) == distillation.data.train.numel()
    calibration = json.loads((exported / "calibration.json").read_text())
    assert calibration["positions"] > 0
    assert calibration["nll"][str(calibration["temperature"])] == min(calibration["nll"].values())
    assert reloaded.char_decoder().temperature == calibration["temperature"]


def test_the_default_recipe_trains_a_readout_on_the_teachers_final_state(process_group, tmp_path):
    """--trainable_layers 0 with the default read-out (2x the hidden size): the student holds no
    decoder layer, its heads and read-out (only they) train on the teacher's final normed state,
    no token regulariser is computed, and the export reproduces it from the tokens."""
    run = tiny_distillation(tmp_path, trainable_layers=0, readout_width=None, max_steps=12)
    student = run.student.module
    assert student.config.readout_width == 2 * student.base.config.hidden_size
    assert run.trunk_layer == len(decoder_layers(student.base)) == 4
    assert not any(sum(1 for _ in layer.parameters()) for layer in decoder_layers(student.base))
    # neither token embedding nor LM head (no token regulariser): of the base model only the final norm
    assert sum(p.ds_numel for p in student.base.parameters()) == student.base.config.hidden_size
    assert set(student.trainable_parameter_names()) == {"char_heads." + n for n, _ in student.char_heads.named_parameters()}
    steps = [run.train_step(step) for step in range(12)]
    losses = [m["loss/total"] for m in steps]
    assert all(m["loss/token"] == 0.0 for m in steps)
    assert all(math.isfinite(loss) for loss in losses) and sum(losses[-3:]) < 0.9 * sum(losses[:3])
    assert gathered(student.char_heads)["readout.2.weight"].abs().sum() > 0  # the read-out left the identity

    ids = run.data.held_out[:2, :16]
    run.student.eval()
    with torch.no_grad():
        _, final = teacher_signal(run.teacher.module, ids, trunk_layer=run.trunk_layer)
        expected = run.student(trunk_hidden=final).char_logits
        assert torch.allclose(whole_student(run)(ids).char_logits, expected, atol=1e-5)
    exported = export.export(run.save(12), tmp_path / "model")
    with torch.no_grad():
        assert torch.allclose(spellm_outputs(load(exported), ids).char_logits, expected, atol=1e-5)


def test_each_learning_rate_flag_gives_its_parameters_their_own_schedule(process_group, tmp_path):
    """--ffn_lr and --head_lr: the read-out trains at --lr, the heads' rows at --head_lr and the FFNs
    at --ffn_lr, all under the same warm-up and decay; with every fidelity lever on, the loss still falls."""
    run = tiny_distillation(tmp_path, max_steps=20, lr=1e-2, head_lr=5e-3, ffn_lr=1e-3, readout_width=16, warmup=2,
                            ignore_after_end=True, reg_target="teacher", reg_weight=1.0, soft_char_weight=0.5,
                            soft_char_candidates=16, label_prior_weight=0.5, spelling_kl_weight=0.5)
    groups = run.student.optimizer.optimizer.param_groups if hasattr(run.student.optimizer, "optimizer") \
        else run.student.optimizer.param_groups
    assert len(groups) == 3
    losses, lrs = [], []
    for step in range(20):
        metrics = run.train_step(step)
        assert metrics["loss/spelling_kl"] > 0 and metrics["loss/soft_char"] > 0
        losses.append(metrics["loss/total"])
        lrs.append(run.student.get_lr())
    assert all(rows == pytest.approx(readout / 2) and ffn == pytest.approx(readout / 10) for readout, rows, ffn in lrs)
    assert max(lrs) == pytest.approx((1e-2, 5e-3, 1e-3))  # each reaches its peak, then all decay together
    assert lrs[-1][0] < 0.5e-2
    assert all(math.isfinite(loss) for loss in losses) and sum(losses[-3:]) < 0.95 * sum(losses[:3])


def test_the_teacher_cache_is_the_teacher_and_skips_it_after_the_first_pass(process_group, tmp_path):
    """--teacher_cache on the default recipe over four blocks (two steps a pass): the same losses
    and held-out rates as the teacher computed afresh, read back from the third step on, entries equal
    to the teacher's output for each block; a run linking them in with --teacher_cache_from reads
    them from its first step to the same losses; a run of another seed may not link them, and starts
    its own cache anew."""
    settings = dict(trainable_layers=0, readout_width=16, train_blocks=4, soft_char_candidates=16, max_steps=6)
    (tmp_path / "plain").mkdir()
    plain = tiny_distillation(tmp_path / "plain", **settings)
    (tmp_path / "cached").mkdir()
    cached = tiny_distillation(tmp_path / "cached", teacher_cache=True, **settings)
    assert len(cached.data.train) == 4
    untrained = plain.evaluate()
    assert untrained == cached.evaluate() == cached.evaluate()  # the second from the cache
    names = ("loss/total", "loss/soft_char", "match/exact_or_prefix")
    reads, expected = [], []
    for step in range(6):
        expected.append(plain.train_step(step))
        got = cached.train_step(step)
        for name in names:
            assert got[name] == pytest.approx(expected[step][name], rel=1e-6, abs=1e-7), (step, name)
        reads.append(got["perf/teacher_cache_read"])
    assert reads == [0, 0, 1, 1, 1, 1]
    shared = tiny_distillation(tmp_path / "cached", teacher_cache=True, output_dir=str(tmp_path / "cached" / "shared"),
                               teacher_cache_from=str(tmp_path / "cached" / "out"), **settings)
    assert sorted(shared.cache.stored("train")) == [0, 1, 2, 3]
    assert shared.evaluate() == untrained
    for step in range(6):
        got = shared.train_step(step)
        assert got["perf/teacher_cache_read"] == 1, step
        for name in names:
            assert got[name] == pytest.approx(expected[step][name], rel=1e-6, abs=1e-7), (step, name)
    with pytest.raises(SpellmError, match="written for another .*seed"):
        tiny_distillation(tmp_path / "cached", teacher_cache=True, seed=1, output_dir=str(tmp_path / "cached" / "s1"),
                          teacher_cache_from=str(tmp_path / "cached" / "out"), **settings)
    for split in ("train", "held_out"):
        for block in range(4):
            signal, trunk = cached.cache.read(split, [block], cached.device)
            fresh, final = teacher_signal(cached.teacher.module, getattr(cached.data, split)[[block]],
                                          trunk_layer=cached.trunk_layer, wide_k=16 if split == "train" else None)
            assert torch.equal(signal.top_ids, fresh.top_ids) and torch.equal(trunk, final)
            assert torch.equal(signal.top_probs, fresh.top_probs) and torch.equal(signal.entropy, fresh.entropy)
            assert (signal.wide_ids is None) == (split == "held_out")
            if signal.wide_ids is not None:
                assert torch.equal(signal.wide_ids, fresh.wide_ids) and torch.equal(signal.wide_probs, fresh.wide_probs)
    assert cached.cache.prepare()  # the same run keeps it
    other = tiny_distillation(tmp_path / "cached", teacher_cache=True, seed=1, resume="none", **settings)
    assert not list((other.cache.directory / "train").iterdir())


def test_noised_states_add_sigma_times_each_positions_rms():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 64, 256, generator=g) * torch.linspace(0.5, 4.0, 64).view(1, 64, 1)
    noised = noised_states(hidden, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(noised, noised_states(hidden, 0.3, torch.Generator().manual_seed(1)))
    assert not torch.equal(noised, noised_states(hidden, 0.3, torch.Generator().manual_seed(2)))
    rms = lambda x: x.pow(2).mean(-1).sqrt()  # noqa: E731
    assert torch.allclose(rms(noised - hidden) / rms(hidden), torch.full((2, 64), 0.3), rtol=0.15)
    assert torch.equal(noised_states(hidden, 0.0, torch.Generator().manual_seed(1)), hidden)
    assert noised_states(hidden.bfloat16(), 0.3, g).dtype == torch.bfloat16


def test_state_noise_trains_on_noised_states_labelled_by_the_teachers_lm_head(process_group, tmp_path, monkeypatch):
    """--state_noise on the default recipe with the teacher cache: the student reads the teacher's
    final state plus the step's noise, the labels' signal is the (ZeRO-3) LM head's top-k at that
    state, the cache keeps the clean state (without a cache the clean state's LM head is not run);
    evaluation is untouched and the loss falls."""
    settings = dict(trainable_layers=0, readout_width=16, train_blocks=4, max_steps=8, teacher_cache=True)
    run = tiny_distillation(tmp_path, state_noise=0.5, **settings)
    rows = torch.tensor([0, 1])
    signal, out, _, _, read = run._forward("train", rows, False, cached=False, store=[True, True],
                                           noise=torch.Generator().manual_seed(7))
    assert not read
    clean, final = teacher_signal(run.teacher.module, run.data.train[rows], trunk_layer=run.trunk_layer)
    cached_signal, cached_trunk = run.cache.read("train", [0, 1], run.device)
    assert torch.equal(cached_trunk, final) and torch.equal(cached_signal.top_ids, clean.top_ids)
    noised = noised_states(final, 0.5, torch.Generator().manual_seed(7))
    expected = top_tokens_from_hidden(noised, run.teacher.module.get_output_embeddings())
    assert torch.equal(signal.top_ids, expected.top_ids) and torch.allclose(signal.top_probs, expected.top_probs)
    kept = (signal.top_ids[..., 0] == clean.top_ids[..., 0]).float().mean()
    assert 0.05 < kept < 0.95  # new labels at some positions, not all
    with torch.no_grad():
        assert torch.allclose(out.char_logits, run.student(trunk_hidden=noised).char_logits, atol=1e-6)

    # without a cache nothing reads the clean state's signal: the LM head runs on the noised state only
    (tmp_path / "uncached").mkdir()
    uncached = tiny_distillation(tmp_path / "uncached", state_noise=0.5, **{**settings, "teacher_cache": False})
    head_passes = []
    real_pass = teacher_module.top_tokens_from_hidden
    monkeypatch.setattr(teacher_module, "top_tokens_from_hidden",
                        lambda *args, **kwargs: head_passes.append(1) or real_pass(*args, **kwargs))
    alone, *_ = uncached._forward("train", rows, False, cached=False, store=[True, True],
                                  noise=torch.Generator().manual_seed(7))
    monkeypatch.undo()
    assert not head_passes  # teacher_signal ran the decoder alone
    assert torch.equal(alone.top_ids, signal.top_ids) and torch.equal(alone.top_probs, signal.top_probs)

    (tmp_path / "clean").mkdir()
    plain = tiny_distillation(tmp_path / "clean", **settings)
    assert run.evaluate() == plain.evaluate()
    losses = [run.train_step(step)["loss/total"] for step in range(8)]
    assert plain.train_step(0)["loss/total"] != pytest.approx(losses[0], rel=1e-6)
    assert all(math.isfinite(loss) for loss in losses) and sum(losses[-3:]) < 0.9 * sum(losses[:3])


def test_anchored_states_move_a_state_towards_the_drawn_token():
    """Every anchored state is a source state moved by ANCHOR_SHIFT times its norm, in a direction
    whose largest logit change is the drawn token's (one of ``tokens``), and the same generator
    draws the same states."""
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(32, 512, bias=False)
    tokens = torch.arange(100, 400, 3)
    anchors = StateAnchors(lm_head, tokens)
    source = torch.randn(32)
    hidden = source.expand(2, 16, 32).clone()  # one source state, so each move is known
    moved = anchors.states(hidden, 3, torch.Generator().manual_seed(1))
    assert moved.shape == (3, 16, 32) and moved.dtype == hidden.dtype
    assert torch.equal(moved, anchors.states(hidden, 3, torch.Generator().manual_seed(1)))
    assert not torch.equal(moved, anchors.states(hidden, 3, torch.Generator().manual_seed(2)))
    shift = (moved - source).norm(dim=-1) / source.norm()
    assert ((shift >= ANCHOR_SHIFT[0] - 1e-4) & (shift <= ANCHOR_SHIFT[1] + 1e-4)).all() and shift.std() > 0.02
    with torch.no_grad():
        raised = lm_head(moved - source).argmax(-1)  # the token each move favours most
    assert torch.isin(raised, tokens).float().mean() > 0.9
    assert len(raised.unique()) > 20  # many tokens, not one direction
    assert anchors.states(hidden.bfloat16(), 1, torch.Generator().manual_seed(1)).dtype == torch.bfloat16


def test_anchored_rows_add_states_labelled_by_the_teachers_lm_head(process_group, tmp_path):
    """--anchored_rows on the default recipe: after the text's rows the student reads that many
    rows of anchored states (drawn from the training text's spellable tokens), labelled by the
    (ZeRO-3) LM head's top-k there; the training metrics count the text's positions only, so step 0
    measures the same as a plain run's while the loss differs; evaluation is untouched; the loss falls."""
    settings = dict(trainable_layers=0, readout_width=16, train_blocks=4, max_steps=8)
    run = tiny_distillation(tmp_path, anchored_rows=1, **settings)
    counts = torch.bincount(run.data.train.flatten(), minlength=run.table.vocab_size)
    assert torch.equal(run.anchors.tokens, ((counts > 0) & run.table.spellable.cpu()).nonzero().squeeze(1))
    rows = torch.tensor([0, 1])
    signal, out, labels, _, _ = run._forward("train", rows, False, cached=False, store=[False, False],
                                             anchors=torch.Generator().manual_seed(7))
    clean, final = teacher_signal(run.teacher.module, run.data.train[rows], trunk_layer=run.trunk_layer)
    anchored = run.anchors.states(final, 1, torch.Generator().manual_seed(7))
    expected = top_tokens_from_hidden(anchored, run.teacher.module.get_output_embeddings())
    assert signal.top_ids.shape[0] == 3 and labels.chars.shape[0] == 3
    assert torch.equal(signal.top_ids[:2], clean.top_ids) and torch.equal(signal.top_ids[2:], expected.top_ids)
    assert torch.allclose(signal.top_probs[2:], expected.top_probs)
    with torch.no_grad():
        assert torch.allclose(out.char_logits[2:], run.student(trunk_hidden=anchored).char_logits, atol=1e-6)

    (tmp_path / "plain").mkdir()
    plain = tiny_distillation(tmp_path / "plain", **settings)
    assert run.evaluate() == plain.evaluate()
    first, first_plain = run.train_step(0), plain.train_step(0)
    assert first["loss/total"] != pytest.approx(first_plain["loss/total"], rel=1e-6)
    matches = [name for name in first_plain if not name.startswith(("loss/", "perf/"))]
    assert matches and all(first[name] == pytest.approx(first_plain[name], abs=1e-9) for name in matches)
    losses = [first["loss/total"]] + [run.train_step(step)["loss/total"] for step in range(1, 8)]
    assert all(math.isfinite(loss) for loss in losses) and sum(losses[-3:]) < 0.9 * sum(losses[:3])


def test_rare_label_power_weights_the_char_loss_by_each_labels_training_count(process_group, tmp_path):
    """--rare_label_power: weights from the training blocks' token counts; a step's char loss is
    the weighted mean of its labels' char NLL, not the plain one."""
    run = tiny_distillation(tmp_path, rare_label_power=0.5, trainable_layers=0, readout_width=16)
    counts = torch.bincount(run.data.train.flatten(), minlength=run.table.vocab_size)
    assert torch.allclose(run.label_weights, (counts.double() + 1).pow(-0.5).float())
    cfg = run.config
    rows, _ = step_rows(len(run.data.train), 0, 0, cfg.grad_accum, cfg.micro_batch, run.rank, run.world_size, cfg.seed)
    with torch.no_grad():
        signal, out, labels, *_ = run._forward("train", rows, cfg.needs_token_logits, cached=False,
                                               store=[False] * len(rows))
        weighted, plain = (distillation_loss(out.char_logits, out.token_logits, labels, signal, run.table, run.recipe,
                                             label_weights=weights).char for weights in (run.label_weights, None))
    assert float(weighted) != pytest.approx(float(plain), rel=1e-3)
    assert run.train_step(0)["loss/char"] == pytest.approx(float(weighted), rel=1e-5)


def test_a_teacher_that_fits_runs_whole_without_zero3_hooks(distillation, tmp_path):
    """With persistence "auto" a tiny teacher persists entirely: its hooks are removed, its
    parameters stay whole across steps (the LM head's gather block must not free them), and its
    signal equals the fully sharded, hooked teacher's on the same ids."""
    from spellm_ds.distill.engines import keep_whole_without_hooks

    whole = tiny_distillation(tmp_path, persistence="auto")
    assert not keep_whole_without_hooks(distillation.teacher)  # fully sharded: keeps its hooks

    def hooked(engine) -> int:  # submodules with forward hooks (the engine's own sit on the root, never called)
        return sum(bool(m._forward_pre_hooks or m._forward_hooks) for m in list(engine.module.modules())[1:])

    assert hooked(distillation.teacher) > 0 and hooked(whole.teacher) == 0
    ids = distillation.data.held_out[:2]
    with torch.no_grad():
        for _ in range(2):  # the second call finds the parameters still whole
            signal, _ = teacher_signal(whole.teacher.module, ids)
            assert all(p.numel() == p.ds_numel for p in whole.teacher.module.parameters())
        sharded, _ = teacher_signal(distillation.teacher.module, ids)
    assert torch.equal(signal.top_ids, sharded.top_ids)
    assert torch.allclose(signal.top_probs, sharded.top_probs, atol=1e-6)
    losses = [whole.train_step(step)["loss/total"] for step in range(2)]
    assert all(math.isfinite(loss) for loss in losses)


def test_prototype_heads_train_under_zero3_on_their_filled_rows_only(process_group, tmp_path):
    """--prototypes on the default recipe, fully sharded: the heads compute the filled slots of a
    partitioned weight (gathered by ZeRO-3 for the call), the sharded student's char logits equal
    the whole model's, training moves filled rows only, and the loss falls."""
    run = tiny_distillation(tmp_path, trainable_layers=0, readout_width=32, prototypes=4, max_steps=12)
    heads = run.student.module.char_heads
    assert heads.proj.weight.ds_numel > 0 and heads.proj.weight.numel() == 0  # partitioned, released
    empty = heads.empty_slots.clone()
    assert empty.any() and not empty.all()
    before = gathered(heads)["proj.weight"]
    losses = [run.train_step(step)["loss/total"] for step in range(12)]
    after = gathered(heads)["proj.weight"]
    moved = (after - before).abs().sum(-1) > 0
    assert bool(moved[~empty].any()) and not bool(moved[empty].any())
    assert bool((after[empty] == 0).all())
    ids = run.data.held_out[:2]
    run.student.eval()
    with torch.no_grad():
        _, trunk = teacher_signal(run.teacher.module, ids, trunk_layer=run.trunk_layer)
        shared = run.student(trunk_hidden=trunk)
        whole = whole_student(run)
        whole.char_heads.empty_slots.copy_(empty)  # a buffer: whole_student carries the parameters
        naive = whole(ids)
    run.student.train()
    assert torch.allclose(shared.char_logits, naive.char_logits, atol=1e-5)
    assert bool((shared.char_logits == -1e4).any())  # a (position, char) no prototype holds
    assert all(math.isfinite(loss) for loss in losses) and sum(losses[-3:]) < 0.9 * sum(losses[:3])


def test_copy_lists_train_export_and_refuse_a_resume_that_changes_them(process_group, tmp_path):
    """--copy_lists on the default recipe with a padded vocabulary (Qwen2): the run's training blocks
    are the packed data's with every fourth a list block, it trains on them, the export fits its
    temperature on the same held-out blocks without packing anew, and a resume with another share
    is refused."""
    from spellm_ds.data import assets, copy_lists

    settings = dict(trainable_layers=0, readout_width=32, copy_lists=0.25, max_steps=6, save_every=6)
    run = tiny_distillation(tmp_path, "qwen2", **settings)
    rows = copy_lists.list_rows(len(run.data.train), 0.25)
    assert rows.tolist()[:8] == [False, False, False, True] * 2
    assert "training blocks of 32 tokens (25% of them copy lists)" in run.header()
    listed = run.tokenizer.decode(run.data.train[rows].flatten())
    assert "The same list again:" in listed and "The same list again:" not in run.tokenizer.decode(
        run.data.train[~rows].flatten())
    losses = [run.train_step(step)["loss/total"] for step in range(6)]
    saved = run.save(6)
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    packed = len(list((assets.cache_root() / "packed").iterdir()))
    blocks = export.run_blocks(RunConfig(**run.config.to_dict()), run.tokenizer)
    assert torch.equal(blocks.held_out, run.data.held_out) and torch.equal(blocks.train, run.data.train)
    assert len(list((assets.cache_root() / "packed").iterdir())) == packed  # read, not packed again
    assert load(export.export(saved, tmp_path / "model")).char_heads is not None
    with pytest.raises(SpellmError, match="copy_lists"):
        tiny_distillation(tmp_path, "qwen2", **{**settings, "copy_lists": 0.5})


def test_whiten_readout_fixes_the_first_steps_statistics_trains_resumes_and_folds_at_export(process_group, tmp_path):
    """--whiten_readout on the default recipe: before the first step the read-out's input is
    centred on the mean of the teacher's final states over the first step's blocks and whitened;
    the statistics stay fixed while the heads train, a resumed run reads them from its checkpoint,
    and the export, whitening folded into the read-out, reproduces the student's logits."""
    settings = dict(trainable_layers=0, readout_width=32, whiten_readout=True, max_steps=12, save_every=8)
    run = tiny_distillation(tmp_path, **settings)
    heads = run.student.module.char_heads
    cfg = run.config
    rows, _ = step_rows(len(run.data.train), 0, 0, 1, cfg.micro_batch, 0, 1, cfg.seed)
    with torch.no_grad():
        _, final = teacher_signal(run.teacher.module, run.data.train[rows], trunk_layer=run.trunk_layer)
    assert torch.allclose(heads.whiten_mean, final.flatten(0, 1).mean(0), atol=1e-5)
    states = final.flatten(0, 1).double()
    variances = torch.linalg.eigvalsh(states.T.cov(correction=0))
    whitened = torch.nn.functional.linear(states - heads.whiten_mean.double(), heads.whiten_matrix.double())
    shrunk = variances / (0.9 * variances + 0.1 * variances.mean())  # unit variance, up to the default shrinkage
    assert torch.allclose(torch.linalg.eigvalsh(whitened.T.cov(correction=0)), shrunk, atol=1e-3)
    fitted = heads.whiten_matrix.clone()
    losses = [run.train_step(step)["loss/total"] for step in range(8)]
    assert torch.equal(heads.whiten_matrix, fitted)  # not trained
    heads.whiten_mean.add_(0.5)  # so a resume that fitted them anew would differ
    saved = run.save(8)
    assert all(math.isfinite(loss) for loss in losses) and sum(losses[-3:]) < 0.9 * sum(losses[:3])

    resumed = tiny_distillation(tmp_path, **settings)  # --resume auto: from step 8
    assert resumed.start_step == 8
    assert torch.equal(resumed.student.module.char_heads.whiten_matrix, fitted)
    assert torch.equal(resumed.student.module.char_heads.whiten_mean, heads.whiten_mean)
    ids = run.data.held_out[:2, :16]
    run.student.eval()
    with torch.no_grad():
        _, trunk = teacher_signal(run.teacher.module, ids, trunk_layer=run.trunk_layer)
        expected = run.student(trunk_hidden=trunk).char_logits
    exported = load(export.export(saved, tmp_path / "model"))
    assert not exported.char_heads.whitened and "whiten_matrix" not in exported.char_heads.state_dict()
    with torch.no_grad():
        assert torch.allclose(spellm_outputs(exported, ids).char_logits, expected, atol=1e-4)
