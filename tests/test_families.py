"""Every model-facing path on tiny Llama-, GPT-2- and Qwen2-style models (the last with a padded
vocabulary, an untied LM head and a sliding-window layer)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from spellm_ds.data.assets import load_tokenizer
from spellm_ds.distill.losses import select_labels
from spellm_ds.distill.teacher import teacher_signal
from spellm_ds.model.charset import Charset
from spellm_ds.model.decoding import generate
from spellm_ds.model.spelling import SpellingTable, model_vocab_size
from spellm_ds.model.spellm import attention, decoder_layers, feed_forward, shared_trunk_layer, untrained
from tests import tiny


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def family_dir(request, tmp_path_factory):
    return tiny.tiny_model_dir(tmp_path_factory.mktemp(request.param), tiny.corpus_texts(60), request.param)


@pytest.fixture(scope="module")
def padded_dir(tmp_path_factory):
    return tiny.tiny_model_dir(tmp_path_factory.mktemp("padded"), tiny.corpus_texts(60), "qwen2")


@pytest.mark.parametrize("trainable_layers, readout_width", [(1, 0), (0, 24)])
def test_shared_trunk_equals_the_full_student_forward(family_dir, trainable_layers, readout_width):
    """From the teacher's state entering the first trainable layer, or (no trainable layers) its
    final state with an MLP read-out, the student computes what it computes from the tokens."""
    teacher = AutoModelForCausalLM.from_pretrained(family_dir).eval()
    torch.manual_seed(0)
    student = tiny.student(AutoModelForCausalLM.from_pretrained(family_dir), k=6, trainable_layers=trainable_layers,
                           readout_width=readout_width).eval()
    for weight in student.char_heads.parameters():  # the read-out's output layer starts at zero
        torch.nn.init.normal_(weight, std=0.3)
    layer = shared_trunk_layer(teacher.config.num_hidden_layers, trainable_layers)
    ids = torch.randint(0, len(load_tokenizer(family_dir)), (2, 40))  # longer than Qwen2's 16-token window
    with torch.no_grad():
        signal, trunk = teacher_signal(teacher, ids, trunk_layer=layer)
        full = student(ids, with_token_logits=True)
        shared = student(trunk_hidden=trunk, with_token_logits=True)
        teacher_logits = teacher(ids).logits
    assert torch.equal(signal.top_ids, teacher_logits.topk(5, -1).indices)
    assert torch.allclose(shared.hidden, full.hidden, atol=1e-5)
    assert torch.allclose(shared.char_logits, full.char_logits, atol=1e-5)
    assert torch.allclose(shared.token_logits, teacher_logits, atol=1e-4)  # untrained student == teacher


def test_tables_cover_the_model_vocabulary(family_dir):
    tokenizer = load_tokenizer(family_dir)
    model = AutoModelForCausalLM.from_pretrained(family_dir)
    vocab = model_vocab_size(model.config)
    table = SpellingTable.from_tokenizer(tokenizer, Charset.default(), 6, vocab)
    assert table.vocab_size == vocab == model.get_output_embeddings().weight.shape[0] >= len(tokenizer)
    assert not table.spellable[len(tokenizer):].any()
    spellm = untrained(family_dir, k=6, trainable_layers=1)
    assert spellm.spelling.vocab_size == vocab and torch.equal(spellm.spelling_chars, table.chars)


def test_a_padding_row_in_the_top_5_is_never_a_label(padded_dir):
    tokenizer = load_tokenizer(padded_dir)
    vocab = model_vocab_size(AutoModelForCausalLM.from_pretrained(padded_dir).config)
    assert vocab > len(tokenizer)
    table = SpellingTable.from_tokenizer(tokenizer, Charset.default(), 6, vocab)
    spellable = table.spellable.nonzero().squeeze(1)[-4:]
    top_ids = torch.cat([torch.tensor([vocab - 1]), spellable]).view(1, 1, 5)
    char_logits = torch.zeros(1, 1, 6, len(table.charset))
    char_logits[0, 0, :, 0] = 10.0  # all END: the padding row's (empty) spelling would score best
    for prior in (None, torch.tensor([[[0.96, 0.01, 0.01, 0.01, 0.01]]])):
        labels = select_labels(char_logits, top_ids, table.chars, table.spellable, prior)
        assert labels.token_ids.item() in spellable.tolist() and labels.valid.item()


def test_train_attention_adds_exactly_the_top_layers_attention(family_dir):
    """--train_attention: the heads, and the FFN and attention blocks of the top layers, nothing else."""
    base = AutoModelForCausalLM.from_pretrained(family_dir)
    model = tiny.student(base, k=6, trainable_layers=2, train_attention=True)
    model.freeze_for_distillation()
    layers = decoder_layers(base)
    expected = {id(p) for p in model.char_heads.parameters()}
    for layer in list(layers)[-2:]:
        expected |= {id(p) for p in feed_forward(layer).parameters()} | {id(p) for p in attention(layer).parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected
    assert all(not p.requires_grad for layer in list(layers)[:-2] for p in layer.parameters())
    out = model(torch.randint(0, 50, (1, 8)))
    out.char_logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attention(layers[-1]).parameters())


@pytest.mark.parametrize("candidates", ["rerank_k", "shortlist"])
def test_rerank_over_every_spelling_is_greedy_decoding_over_the_nameable_tokens(family_dir, candidates):
    """With every valid spelling a candidate (the heads' top-K, or a shortlist of them all),
    re-ranked decoding is the LM head's greedy choice among the tokens the char heads can name
    (never a padding row); its provenance marks each token that is not the heads' own argmax string."""
    from spellm_ds.hf.char_decoding import Provenance
    from spellm_ds.model.decoding import decode_loop

    student = untrained(family_dir, k=6)
    student.token_counts.fill_(1)  # every token counted: the shortlist holds every valid spelling
    torch.manual_seed(0)
    torch.nn.init.normal_(student.char_heads.proj.weight, std=0.3)
    base = student.base
    nameable = student.spelling.canonical
    lm_head = base.get_output_embeddings()

    def masked_greedy(hidden, finished):
        logits = lm_head(hidden).float().masked_fill(~nameable, float("-inf"))
        return logits.argmax(-1), torch.zeros_like(finished, dtype=torch.long)

    ids = torch.randint(0, len(student.tokenizer), (3, 7), generator=torch.Generator().manual_seed(1))
    out = generate(student, ids, max_new_tokens=12, tau=None, eos_token_id=None, **{candidates: int(nameable.sum())})
    expected = decode_loop(base, masked_greedy, ids, None, 12).sequences
    assert torch.equal(out.sequences, expected)
    assert nameable[out.sequences].all()
    assert (out.provenance == Provenance.RERANKED).any()  # random heads rarely spell the LM head's choice
    assert ((out.provenance == Provenance.EXACT) | (out.provenance == Provenance.RERANKED)).all()


def test_untrained_prototype_heads_spell_the_teachers_choice_after_export(family_dir, tmp_path):
    """``--prototypes`` with a slot for every token: the untrained heads (read-out at identity, the
    trunk the teacher's) spell the LM head's best spellable token at every position, and so does
    the exported model reloaded through transformers (prototype rows and masks saved with it)."""
    from spellm_ds.hf.char_decoding import read_string
    from spellm_ds.model.spellm import save_export

    model = untrained(family_dir, k=6, trainable_layers=0, readout_width=24, prototypes=512)
    save_export(model, tmp_path / "export", model.tokenizer, family_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert reloaded.config.prototypes == 512 and torch.equal(reloaded.char_heads.empty_slots,
                                                             model.char_heads.empty_slots)
    ids = torch.tensor([model.tokenizer.encode(text)[:24] for text in tiny.corpus_texts(63)[60:63]])
    chars, lengths = model.spelling_chars, model.spelling_lengths
    with torch.no_grad():
        hidden = reloaded.base.get_decoder()(ids).last_hidden_state
        best = reloaded.get_output_embeddings()(hidden).masked_fill(lengths == 0, float("-inf")).argmax(-1)
        spelled = read_string(reloaded.char_heads(hidden))
    assert torch.equal(spelled, chars[best]), (spelled != chars[best]).any(-1).float().mean()
