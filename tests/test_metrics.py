"""Training metrics split by the teacher's top-1 length and count band, and the label = top-1 share."""

import pytest
import torch

from spellm_ds.distill.losses import Labels
from spellm_ds.distill.metrics import BAND_EDGES, LENGTH_EDGES, group_name, group_of, match_sums, rates
from spellm_ds.distill.teacher import TeacherSignal
from spellm_ds.model.charset import Charset
from spellm_ds.model.spelling import SpellingTable
from tests.test_analysis import tok


@pytest.fixture(scope="module")
def table(byte_level_tokenizer):
    return SpellingTable.from_tokenizer(byte_level_tokenizer, Charset.default(), 8, len(byte_level_tokenizer))


def logits_spelling(table, token_ids):
    """Char logits whose argmax string is each token's spelling."""
    chars = table.chars[token_ids]
    return torch.nn.functional.one_hot(chars, len(table.charset)).float() * 10


def test_group_names_and_edges():
    assert [group_name(LENGTH_EDGES, i) for i in range(len(LENGTH_EDGES))] == ["1", "2", "3-4", "5", "6", "7-8", "9+"]
    assert [group_name(BAND_EDGES, i) for i in range(len(BAND_EDGES))] == ["0", "1-9", "10-99", "100-999",
                                                                           "1000-9999", ">=10000"]
    assert group_of(torch.tensor([1, 2, 4, 5, 8, 9, 30]), LENGTH_EDGES).tolist() == [0, 1, 2, 3, 5, 6, 6]


def test_match_and_label_share_by_length_and_band(table, byte_level_tokenizer):
    the, cafe, hello, x = (tok(byte_level_tokenizer, t) for t in (" the", " cafe", "hello", " x"))
    # four positions: top-1 " the" (4 chars) twice, " cafe" (5), " x" (2)
    top = torch.tensor([[[the, cafe, hello, x, the], [the, x, hello, cafe, the],
                         [cafe, the, hello, x, the], [x, the, hello, cafe, the]]])
    predicted = torch.tensor([[the, hello, cafe, the]])  # right, wrong, right, wrong
    label_ids = torch.tensor([[the, x, the, x]])  # the label is the top-1 at positions 0 and 3
    labels = Labels(label_ids, table.chars[label_ids], torch.ones(1, 4, dtype=torch.bool))
    signal = TeacherSignal(top, torch.full((1, 4, 5), 0.2), torch.ones(1, 4))
    counts = torch.zeros(table.vocab_size, dtype=torch.long)
    counts[the], counts[cafe], counts[x] = 20000, 5, 0
    out = rates(match_sums(logits_spelling(table, predicted), signal, labels, table, counts))
    assert out["match/exact_or_prefix"] == 0.5 and out["label/top1_share"] == 0.5
    assert out["match_by_length/3-4"] == 0.5 and out["label_top1_by_length/3-4"] == 0.5
    assert out["match_by_length/5"] == 1.0 and out["label_top1_by_length/5"] == 0.0
    assert out["match_by_length/2"] == 0.0 and out["label_top1_by_length/2"] == 1.0
    assert out["match_by_band/>=10000"] == 0.5 and out["match_by_band/1-9"] == 1.0 and out["match_by_band/0"] == 0.0
    assert "match_by_length/1" not in out  # no position there
    no_bands = rates(match_sums(logits_spelling(table, predicted), signal, labels, table))
    assert not any(name.startswith("match_by_band/") for name in no_bands)
