import torch
from transformers import AutoModelForCausalLM

from spellm_ds.charset import Charset
from spellm_ds.heads import CharHeads
from spellm_ds.model import SpeLLMConfig, SpeLLMForCausalLM
from spellm_ds.spelling import SpellingTable
from spellm_ds.assets import load_tokenizer
from tests import tiny


def test_fused_heads_equal_k_separate_heads():
    heads = CharHeads(hidden_size=16, k=3, num_chars=5)
    hidden = torch.randn(2, 4, 16)
    fused = heads(hidden)
    w, b = heads.proj.weight.view(3, 5, 16), heads.proj.bias.view(3, 5)
    for j in range(3):
        assert torch.allclose(fused[..., j, :], torch.nn.functional.linear(hidden, w[j], b[j]), atol=1e-6)


def test_the_readout_starts_as_the_identity_and_is_a_residual_mlp():
    torch.manual_seed(0)
    plain, behind = CharHeads(16, k=3, num_chars=5), CharHeads(16, k=3, num_chars=5, readout_width=32)
    behind.proj.load_state_dict(plain.proj.state_dict())
    hidden = torch.randn(2, 4, 16)
    assert torch.equal(behind(hidden), plain(hidden))  # its output layer starts at zero
    torch.nn.init.normal_(behind.readout[2].weight)
    w1, b1 = behind.readout[0].weight, behind.readout[0].bias
    mixed = hidden + torch.nn.functional.gelu(hidden @ w1.T + b1) @ behind.readout[2].weight.T
    assert torch.allclose(behind(hidden), plain(mixed), atol=1e-5)


def test_embedding_init_is_the_mean_embedding_per_position_and_char():
    heads = CharHeads(hidden_size=2, k=2, num_chars=3)
    emb = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    chars = torch.tensor([[1, 2], [1, 0], [2, 0]])
    heads.init_from_embeddings(emb, chars, torch.tensor([True, True, False]))
    weight = heads.proj.weight.view(2, 3, 2)
    assert torch.equal(weight[0, 1], torch.tensor([2.0, 1.0]))  # tokens 0 and 1 have char 1 first
    assert torch.equal(weight[1, 2], torch.tensor([1.0, 0.0]))
    assert torch.equal(weight[0, 2], torch.zeros(2))  # only the unspellable token 2 had it


def build(tmp_path, trainable_layers=2):
    model_dir = tiny.tiny_llama_dir(tmp_path / "base", tiny.corpus_texts(50))
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return model_dir, SpeLLMForCausalLM(base, SpeLLMConfig(k=6, trainable_layers=trainable_layers, teacher="x"),
                                        Charset.default())


def test_exactly_heads_and_last_ffns_train_and_get_gradients(tmp_path):
    _, model = build(tmp_path)
    count = model.freeze_for_distillation()
    names = set(model.trainable_parameter_names())
    assert names and all(n.startswith("char_heads.") or ".layers.2.mlp." in n or ".layers.3.mlp." in n for n in names)
    assert {n for n in names if n.startswith("char_heads.")} == {"char_heads.proj.weight", "char_heads.proj.bias"}
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    out = model(torch.randint(0, 300, (2, 16)), with_token_logits=True)
    (out.char_logits.float().logsumexp(-1).mean() + out.token_logits.float().logsumexp(-1).mean()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_save_and_reload_reproduce_char_logits(tmp_path):
    model_dir, model = build(tmp_path)
    torch.nn.init.normal_(model.char_heads.proj.weight)
    model.eval()
    ids = torch.randint(0, 300, (2, 12))
    expected = model(ids).char_logits
    model.save_pretrained(tmp_path / "saved", tokenizer=load_tokenizer(model_dir))
    loaded = SpeLLMForCausalLM.from_pretrained(tmp_path / "saved")
    assert loaded.config == model.config and loaded.charset == model.charset
    assert torch.equal(loaded(ids).char_logits, expected)
    tied = loaded.base.get_output_embeddings().weight
    assert tied.data_ptr() == loaded.base.get_input_embeddings().weight.data_ptr()


def test_table_for_trained_tokenizer_is_mostly_spellable(tmp_path):
    tokenizer = tiny.trained_tokenizer(tiny.corpus_texts(50))
    table = SpellingTable.from_tokenizer(tokenizer, Charset.default(), k=6, vocab_size=len(tokenizer))
    assert table.spellable.float().mean() > 0.5
