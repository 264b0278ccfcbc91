import torch
from transformers import AutoModelForCausalLM

from spellm_ds.hf.char_heads import CharHeads
from spellm_ds.model.charset import Charset
from spellm_ds.model.spelling import SpellingTable
from spellm_ds.model.spellm import Student, load, save_export, spellm_config, untrained
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
    config = spellm_config(base.config, Charset.default(), k=6, trainable_layers=trainable_layers, teacher="x")
    return model_dir, Student(base, config)


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


def test_export_and_load_reproduce_char_logits(tmp_path):
    model_dir = tiny.tiny_llama_dir(tmp_path / "base", tiny.corpus_texts(50))
    model = untrained(model_dir, k=6, trainable_layers=2, readout_width=16)
    torch.nn.init.normal_(model.char_heads.proj.weight)
    ids = torch.randint(0, 300, (2, 12))
    from spellm_ds.model.spellm import spellm_outputs

    expected = spellm_outputs(model, ids).char_logits
    save_export(model, tmp_path / "saved", model.tokenizer, model_dir)
    loaded = load(tmp_path / "saved")
    settings = {key: value for key, value in model.config.to_dict().items() if key != "_name_or_path"}
    assert {key: loaded.config.to_dict()[key] for key in settings} == settings
    assert loaded.spelling.charset == Charset.default()
    assert torch.equal(spellm_outputs(loaded, ids).char_logits, expected)
    assert torch.equal(loaded.spelling.chars, model.spelling_chars) and loaded.spelling.exact.any()
    tied = loaded.base.get_output_embeddings().weight
    assert tied.data_ptr() == loaded.base.get_input_embeddings().weight.data_ptr()


def test_table_for_trained_tokenizer_is_mostly_spellable(tmp_path):
    tokenizer = tiny.trained_tokenizer(tiny.corpus_texts(50))
    table = SpellingTable.from_tokenizer(tokenizer, Charset.default(), k=6, vocab_size=len(tokenizer))
    assert table.spellable.float().mean() > 0.5


def test_wide_heads_read_the_readouts_hidden_layer_directly():
    torch.manual_seed(0)
    plain, wide = CharHeads(16, k=3, num_chars=5), CharHeads(16, k=3, num_chars=5, readout_width=32, wide_heads=True)
    wide.proj.load_state_dict(plain.proj.state_dict())
    hidden = torch.randn(2, 4, 16)
    assert torch.equal(wide(hidden), plain(hidden))  # its output layer starts at zero
    assert wide.readout[2].weight.shape == (3 * 5, 32)
    torch.nn.init.normal_(wide.readout[2].weight)
    w1, b1 = wide.readout[0].weight, wide.readout[0].bias
    direct = torch.nn.functional.gelu(hidden @ w1.T + b1) @ wide.readout[2].weight.T
    assert torch.allclose(wide(hidden), plain(hidden) + direct.unflatten(-1, (3, 5)), atol=1e-5)


def test_prototype_heads_start_as_the_teachers_choice_among_their_tokens():
    """Started from the LM-head rows of every token (P >= the largest set), each head's argmax is
    the character of the LM head's argmax token, at any state; with fewer prototypes the slots hold
    the most frequent tokens, empty slots never win, and training moves the rows."""
    from spellm_ds.hf.char_decoding import read_string

    torch.manual_seed(0)
    vocab, d, k, num_chars = 40, 16, 3, 6
    lengths = torch.randint(1, k + 1, (vocab,))
    chars = torch.randint(2, num_chars, (vocab, k)).masked_fill(torch.arange(k) >= lengths[:, None], 0)  # END = 0
    spellable = torch.ones(vocab, dtype=torch.bool)
    spellable[5] = False
    lm_head = torch.randn(vocab, d)
    heads = CharHeads(d, k, num_chars, prototypes=vocab)
    heads.init_prototypes(lm_head, chars, spellable, torch.zeros(vocab))
    states = torch.randn(200, d)
    logits = states @ lm_head.T
    logits[:, 5] = float("-inf")  # the unspellable token is never the heads' to name
    assert torch.equal(read_string(heads(states)), chars[logits.argmax(-1)])
    few = CharHeads(d, k, num_chars, prototypes=2)
    counts = torch.arange(vocab, dtype=torch.float)  # token 39 the most frequent
    few.init_prototypes(lm_head, chars, spellable, counts)
    slots = few.proj.weight.view(k, num_chars, 2, d)
    for j in range(k):
        for c in range(num_chars):
            members = [t for t in reversed(range(vocab)) if spellable[t] and chars[t, j] == c][:2]
            assert few.empty_slots.view(k, num_chars, 2)[j, c].tolist() == [i >= len(members) for i in range(2)]
            for i, token in enumerate(members):
                assert torch.equal(slots[j, c, i], lm_head[token])
    out = few(states)
    held = torch.tensor([[any(chars[t, j] == c and spellable[t] for t in range(vocab)) for c in range(num_chars)]
                         for j in range(k)])
    assert bool((out[:, ~held] == -1e4).all()) and bool((out[:, held] > -1e4).all())
    out.logsumexp(-1).sum().backward()
    assert few.proj.weight.grad.abs().sum() > 0


def test_prototype_heads_compute_the_max_over_filled_slots_with_its_gradient():
    """The prototype heads compute only the filled slots and read the max back with a gather: the
    logits and every gradient equal the plain definition (all slots, empty ones masked, a
    differentiable max), and a changed mask is taken up."""
    from spellm_ds.hf.char_heads import EMPTY_SLOT

    torch.manual_seed(0)
    d, k, num_chars, per_char = 24, 4, 7, 3
    heads = CharHeads(d, k, num_chars, readout_width=16, prototypes=per_char)
    torch.nn.init.normal_(heads.readout[2].weight)
    heads.empty_slots.copy_(torch.rand(k * num_chars * per_char) < 0.5)
    heads.empty_slots.view(k, num_chars, per_char)[1, 2] = True  # a (position, char) with no prototype

    def plain(states):
        logits = heads.proj(states + heads.readout(states)).masked_fill(heads.empty_slots, EMPTY_SLOT)
        return logits.unflatten(-1, (k, num_chars, per_char)).amax(-1)

    states = torch.randn(5, 6, d)
    for _ in range(2):
        weights = torch.randn(5, 6, k, num_chars)
        fast = heads(states)
        assert torch.equal(fast, plain(states))
        assert bool((fast[..., 1, 2] == EMPTY_SLOT).all())
        grads = torch.autograd.grad((fast * weights).sum(), list(heads.parameters()))
        expected = torch.autograd.grad((plain(states) * weights).sum(), list(heads.parameters()))
        for got, want in zip(grads, expected):
            assert torch.allclose(got, want, atol=1e-6)
        heads.empty_slots.view(k, num_chars, per_char)[0] = True  # the layout follows the mask


def test_whitened_readout_input_has_unit_covariance_and_folds_into_plain_heads():
    """``add_whitening`` + ``fit_whitening``: the read-out reads states of identity covariance
    (no shrinkage) or of the shrunk spectrum; ``fold_whitening`` turns the whitened heads' state
    into plain heads with the same logits, and leaves a plain state alone."""
    from spellm_ds.hf.char_heads import fold_whitening

    torch.manual_seed(0)
    d, k, num_chars = 12, 3, 5
    mixing = torch.randn(d, d) * torch.logspace(-2, 1, d)  # variances over four orders of magnitude
    states = torch.randn(4000, d) @ mixing.T + 5 * torch.randn(d)  # and a large common direction
    mean, covariance = states.double().mean(0), states.double().T.cov(correction=0)
    heads = CharHeads(d, k, num_chars, readout_width=8)
    heads.add_whitening()
    assert torch.equal(heads.whiten_matrix, torch.eye(d))  # identity until fitted
    variances = heads.fit_whitening(mean, covariance, shrinkage=0.0)
    assert variances.max() / variances.min() > 1e3
    whitened = torch.nn.functional.linear(states.double() - mean, heads.whiten_matrix.double())
    assert torch.allclose(whitened.T.cov(correction=0), torch.eye(d, dtype=torch.double), atol=1e-4)
    assert torch.allclose(whitened.mean(0), torch.zeros(d, dtype=torch.double), atol=1e-6)
    heads.fit_whitening(mean, covariance, shrinkage=0.5)
    shrunk = torch.nn.functional.linear(states.double() - mean, heads.whiten_matrix.double()).T.cov(correction=0)
    expected = variances / (0.5 * variances + 0.5 * variances.mean())
    assert torch.allclose(torch.linalg.eigvalsh(shrunk), expected.sort().values, atol=1e-4)

    torch.nn.init.normal_(heads.readout[2].weight, std=0.1)
    plain = CharHeads(d, k, num_chars, readout_width=8)
    folded = fold_whitening(heads.state_dict())
    assert "whiten_matrix" not in folded and "whiten_mean" not in folded
    plain.load_state_dict(folded)
    with torch.no_grad():
        assert torch.allclose(plain(states[:50]), heads(states[:50]), atol=1e-4)
        assert not torch.allclose(plain.readout(states[:50]), heads.readout(states[:50]))  # the fold changed W1
    untouched = plain.state_dict()
    assert fold_whitening(untouched) is untouched
