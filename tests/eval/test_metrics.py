import math

import pytest
import torch

from kdistill.errors import DataError
from kdistill.eval.metrics import accuracy, count_parameters, perplexity, size_on_disk, stopwatch


def load(path, cls_name):
    import transformers

    return (getattr(transformers, cls_name).from_pretrained(path),
            transformers.AutoTokenizer.from_pretrained(path))


def ref_perplexity(model, tok, texts, max_length):
    # One text at a time (no padding at all), summing log-probabilities token by token.
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
            for pos in range(ids.shape[1] - 1):
                nll -= float(logp[pos, ids[0, pos + 1]])
                count += 1
    return math.exp(nll / count)


def test_perplexity_matches_slow_reference(gpt2_dir, texts):
    model, tok = load(gpt2_dir, "GPT2LMHeadModel")
    got = perplexity(model, tok, texts, batch_size=5, max_length=24)
    assert got == pytest.approx(ref_perplexity(model, tok, texts, 24), rel=1e-4)
    assert 1 < got < 3 * len(tok)  # a random model is near uniform over the vocabulary


def test_accuracy_matches_per_record_argmax(classifier_dir, texts):
    model, tok = load(classifier_dir, "AutoModelForSequenceClassification")
    names = ["ant", "bee", "cat"]
    records = [{"text": t, "label": names[i % 3]} for i, t in enumerate(texts)]
    expected = 0
    with torch.no_grad():
        for r in records:
            pred = model(**tok(r["text"], return_tensors="pt")).logits.argmax(-1).item()
            expected += pred == names.index(r["label"])
    got = accuracy(model, tok, records, names, batch_size=5, max_length=32)
    assert got == pytest.approx(expected / len(records))
    with pytest.raises(DataError, match="'dog'"):
        accuracy(model, tok, records + [{"text": "x", "label": "dog"}], names)
    with pytest.raises(DataError, match="labelled"):
        accuracy(model, tok, [{"text": "x"}], names)


def test_count_parameters_counts_tied_weights_once(gpt2_dir):
    model, _ = load(gpt2_dir, "GPT2LMHeadModel")
    unique = {p.data_ptr(): p.numel() for p in model.state_dict().values()
              if p.dtype.is_floating_point}
    assert model.lm_head.weight is model.transformer.wte.weight
    # by hand from the config: token and position tables, per block two layer norms, the fused QKV and
    # output projections and the 4x MLP, the final layer norm; the LM head is the token table again
    c = model.config
    d = c.n_embd
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    assert count_parameters(model) == c.vocab_size * d + c.n_positions * d + c.n_layer * block + 2 * d
    assert count_parameters(model) == sum(unique.values())


def test_size_on_disk(make_bert, tmp_path):
    import os
    import shutil

    src = make_bert(0)
    weights = os.path.getsize(os.path.join(src, "model.safetensors"))
    assert size_on_disk(src) == weights
    run = tmp_path / "run"
    shutil.copytree(src, run)
    (run / "extra").mkdir()
    (run / "extra" / "adapter.bin").write_bytes(b"x" * 10)
    (run / "optimizer.bin").write_bytes(b"x" * 1000)  # training state, not weights
    (run / "checkpoint-100").mkdir()
    (run / "checkpoint-100" / "model.safetensors").write_bytes(b"x" * 1000)
    assert size_on_disk(run) == weights + 10
    assert size_on_disk("some-org/some-model") is None


def test_stopwatch():
    with stopwatch() as sw:
        sum(range(1000))
    assert sw.seconds > 0
