import json

import pytest
import torch

from spellm_ds.distill.config import RunConfig, mixed_precision_dtype, resolve_student_config, resolve_teacher_config
from spellm_ds.distill.losses import LossRecipe
from spellm_ds.errors import SpellmError


def write(tmp_path, config, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


def test_auto_values_are_filled_from_the_run(tmp_path):
    run = RunConfig(deepspeed="ds_configs/zero3.json", micro_batch=3, grad_accum=2, lr=5e-4, max_steps=40, warmup=4,
                    trainable_layers=5)
    ds = resolve_student_config(run, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 12 and ds["optimizer"]["params"]["lr"] == 5e-4
    # the heads at --lr, the pretrained blocks at the default --ffn_lr
    assert ds["scheduler"]["params"] == {**ds["scheduler"]["params"], "warmup_max_lr": [5e-4, 1e-3],
                                         "warmup_num_steps": 4, "total_num_steps": 40}
    assert "auto" not in json.dumps(ds)
    teacher = resolve_teacher_config(run, ds, world_size=2)
    assert "optimizer" not in teacher and teacher["bf16"] == {"enabled": True}
    assert teacher["zero_optimization"]["stage"] == 3 and teacher["train_batch_size"] == 6


@pytest.mark.parametrize("bf16", [True, False])
def test_bf16_auto_follows_the_precision_chosen(tmp_path, bf16):
    """The shipped configs leave bf16 "auto": it follows the precision chosen; the teacher follows
    the student; a concrete setting is kept, and one that contradicts --precision is refused."""
    run = RunConfig(deepspeed="ds_configs/zero3.json")
    student = resolve_student_config(run, world_size=2, bf16=bf16)
    teacher = resolve_teacher_config(run, student, world_size=2)
    assert student["bf16"] == teacher["bf16"] == {"enabled": bf16}
    assert mixed_precision_dtype(student) == (torch.bfloat16 if bf16 else torch.float32)
    forced = RunConfig(deepspeed=write(tmp_path, {"bf16": {"enabled": True}}))
    assert resolve_student_config(forced, world_size=1, bf16=False)["bf16"] == {"enabled": True}
    with pytest.raises(SpellmError, match="bf16.enabled=True but --precision is fp32"):
        resolve_student_config(RunConfig(deepspeed=forced.deepspeed, precision="fp32"), world_size=1, bf16=False)


def test_precision_is_bf16_only_where_the_hardware_makes_it_fast(monkeypatch):
    from spellm_ds.runtime import precision

    probe = precision.bf16_speedup
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    chosen = precision.choose("cpu")
    assert chosen.bf16 and "avx512_bf16" in chosen.reason and chosen.dtype == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f"})  # oneDNN would emulate bf16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(precision, "bf16_speedup", lambda: 0.36)  # the Intel VM's 2.8x slower matmul
    slow = precision.choose("cpu")
    assert not slow.bf16 and "0.36x" in slow.reason
    monkeypatch.setattr(precision, "bf16_speedup", lambda: 1.8)
    assert precision.choose("cpu").bf16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # AVX2 only
    assert not precision.choose("cpu").bf16
    assert precision.choose("cpu", "bf16") == precision.Precision(True, "--precision bf16")
    assert precision.choose("cpu", "fp32").dtype == torch.float32
    with pytest.raises(SpellmError, match="--precision 'half'"):
        RunConfig(precision="half").validate()
    measured = probe(repeats=1)  # the probe itself times both dtypes
    assert measured > 0


@pytest.mark.parametrize("trainable_layers, ffn_lr, peak", [(5, None, [3e-3, 1e-3]), (5, 2e-4, [3e-3, 2e-4]),
                                                             (0, None, 3e-3)])
def test_learning_rates_default_to_the_piloted_recipe(trainable_layers, ffn_lr, peak):
    """Heads at 3e-3, pretrained blocks at 1e-3; a single peak when no blocks train."""
    run = RunConfig(trainable_layers=trainable_layers, ffn_lr=ffn_lr)
    ds = resolve_student_config(run, world_size=1)
    assert ds["optimizer"]["params"]["lr"] == run.lr == 3e-3
    assert ds["scheduler"]["params"]["warmup_max_lr"] == peak
    assert run.ffn_lr == (None if trainable_layers == 0 else peak[1])


@pytest.mark.parametrize("trainable_layers, head_lr, peak", [(0, 3e-4, [3e-3, 3e-4]), (2, 3e-4, [3e-3, 3e-4, 1e-3])])
def test_head_lr_gives_the_heads_rows_a_group_of_their_own(tmp_path, trainable_layers, head_lr, peak):
    """--head_lr: the heads' output rows (``proj``) in a group at that peak, the read-out at --lr,
    the pretrained blocks at --ffn_lr, in the order of the scheduler's peaks."""
    from transformers import AutoModelForCausalLM

    from spellm_ds.distill.engines import parameter_groups
    from tests import tiny

    run = RunConfig(trainable_layers=trainable_layers, head_lr=head_lr, readout_width=8)
    assert resolve_student_config(run, world_size=1)["scheduler"]["params"]["warmup_max_lr"] == peak
    base = AutoModelForCausalLM.from_pretrained(tiny.tiny_llama_dir(tmp_path, tiny.corpus_texts(20)))
    student = tiny.student(base, k=4, trainable_layers=trainable_layers, readout_width=8, teacher="x")
    student.freeze_for_distillation()
    groups = parameter_groups(student, run)
    assert [group["lr"] for group in groups] == peak
    names = {id(p): n for n, p in student.named_parameters()}
    members = [sorted(names[id(p)] for p in group["params"]) for group in groups]
    assert members[0] and all(n.startswith("char_heads.readout.") for n in members[0])
    assert members[1] == ["char_heads.proj.bias", "char_heads.proj.weight"]
    assert len(members) == len(peak) and all(members) and all(".mlp." in n for group in members[2:] for n in group)
    with pytest.raises(SpellmError, match="--head_lr 0.001 needs a read-out"):
        RunConfig(head_lr=1e-3, readout_width=0).validate()


@pytest.mark.parametrize("flag, hidden, width", [(None, 576, 1152), (None, 64, 128), (0, 576, 0), (100, 576, 100)])
def test_the_default_recipe_is_a_read_out_twice_the_hidden_size_on_the_teachers_state(flag, hidden, width):
    """The default trains no decoder layer and sizes its read-out by the model; 0 is the paper's heads."""
    from transformers import LlamaConfig

    from spellm_ds.model.charset import Charset

    run = RunConfig(readout_width=flag)
    base, charset = LlamaConfig(hidden_size=hidden, num_hidden_layers=30), Charset.default()
    assert run.trainable_layers == 0 and not run.needs_token_logits
    if flag is None:
        with pytest.raises(ValueError, match="fit_to_model"):
            run.spellm_config(base, charset)
    run.fit_to_model(num_layers=30, hidden_size=hidden)
    recorded = run.spellm_config(base, charset)
    assert run.readout_width == recorded.readout_width == width
    assert recorded.text_config.hidden_size == hidden and recorded.charset == list(charset.symbols)
    assert RunConfig(trainable_layers=5).needs_token_logits and not RunConfig(trainable_layers=5,
                                                                               reg_weight=0).needs_token_logits


def test_the_loss_recipe_carries_each_loss_flag_by_name():
    """Every loss knob reaches the loss as set (a positional mix-up once turned --soft_char_prefix
    into a spelling KL of weight 1)."""
    run = RunConfig(reg_weight=0.7, reg_target="label", soft_char_weight=0.3, ignore_after_end=False,
                    soft_char_prefix=True, spelling_kl_weight=0.2, spelling_kl_fraction=0.5)
    assert run.loss_recipe() == LossRecipe(reg_weight=0.7, reg_target="label", soft_char_weight=0.3,
                                           ignore_after_end=False, soft_char_prefix=True,
                                           spelling_kl_weight=0.2, spelling_kl_fraction=0.5)


def test_concrete_values_are_used_when_flags_are_absent(tmp_path):
    path = write(tmp_path, {"train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "AdamW", "params": {"lr": 0.01}}})
    run = RunConfig(deepspeed=path)
    ds = resolve_student_config(run, world_size=1)
    assert (run.micro_batch, run.grad_accum, run.lr) == (8, 1, 0.01) and ds["train_batch_size"] == 8


@pytest.mark.parametrize("config, flags, message", [
    ({"train_micro_batch_size_per_gpu": 8}, {"micro_batch": 4}, "train_micro_batch_size_per_gpu=8 but --micro_batch"),
    ({"train_batch_size": 100}, {}, "train_batch_size=100"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, {"lr": 0.2}, "lr=0.1 but --lr"),
    ({"zero_optimization": {"stage": "auto"}}, {}, "zero_optimization.stage=\"auto\""),
])
def test_conflicts_are_errors(tmp_path, config, flags, message):
    with pytest.raises(SpellmError, match=message):
        resolve_student_config(RunConfig(deepspeed=write(tmp_path, config), **flags), world_size=2)


def test_unreadable_configs(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SpellmError, match="not readable JSON"):
        resolve_student_config(RunConfig(deepspeed=str(bad)), 1)
    with pytest.raises(SpellmError, match="does not exist"):
        resolve_student_config(RunConfig(deepspeed=str(tmp_path / "none.json")), 1)


def test_teacher_stage_and_offload():
    run = RunConfig(teacher_stage=0)
    ds = resolve_student_config(run, 1)
    assert resolve_teacher_config(run, ds, 1)["zero_optimization"]["stage"] == 0
    with pytest.raises(SpellmError, match="--teacher_offload needs a ZeRO-3 teacher"):
        resolve_teacher_config(RunConfig(teacher_stage=0, teacher_offload=True), ds, 1)
    offload = resolve_teacher_config(RunConfig(teacher_offload=True), ds, 1)
    assert offload["zero_optimization"]["offload_param"] == {"device": "cpu"}


def test_bad_values():
    with pytest.raises(SpellmError, match="--k 0"):
        RunConfig(k=0).validate()


def test_auto_persistence_keeps_small_models_whole_and_shards_large_ones(tmp_path):
    import torch
    from safetensors.torch import save_file

    from spellm_ds.distill.config import FULL_SHARDING_PERSISTENCE, auto_persistence_threshold, parameter_sizes

    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(10)}, str(tmp_path / "model-1.safetensors"))
    save_file({"c": torch.zeros(2, 2, 5)}, str(tmp_path / "model-2.safetensors"))
    assert parameter_sizes(tmp_path) == (42, 20)
    gib = 2**30
    assert auto_persistence_threshold(135_000_000, 28_000_000, 12 * gib) == 28_000_001  # SmolLM2 on this CPU
    assert auto_persistence_threshold(70_000_000_000, 1_000_000_000, 80 * gib) == FULL_SHARDING_PERSISTENCE  # 70B
    assert auto_persistence_threshold(0, 0, 80 * gib) == FULL_SHARDING_PERSISTENCE  # sizes unknown
    run = RunConfig(deepspeed="ds_configs/zero3.json")
    student = resolve_student_config(run, 2, auto_persistence=28_000_001)
    teacher = resolve_teacher_config(run, student, 2, auto_persistence=28_000_001)
    for config in (student, teacher):
        assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 28_000_001
