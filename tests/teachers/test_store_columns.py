"""kdistill.teachers.store beyond plain top-k: the next-token column, sampled stores, index widths."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from test_store import FINGERPRINTS, K, TAU, V, items

from kdistill.errors import CheckpointError
from kdistill.teachers.store import StoreWriter, TeacherStore, sparsify


# ------------------------------------------------------------------------------ next-token column

def next_tokens_of(n: int, seed: int) -> torch.Tensor:
    """A text's next tokens as cache_stage writes them: one per position, none (-1) after the last."""
    tokens = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([tokens[1:], torch.tensor([-1])])


def test_next_token_column_against_a_plain_reference():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(3)) * 3
    following = torch.tensor([0, 5, 11, 2, 2, -1])
    values, indices, tail = sparsify(logits, K, TAU, following)
    assert values.shape == indices.shape == (6, K + 1)
    for row in range(6):
        log_p = torch.log_softmax(logits[row].double() / TAU, -1)
        order = sorted(range(V), key=lambda v: -log_p[v].item())
        nxt = int(following[row])
        expected = [v for v in order if v != nxt][:K] + [nxt] if nxt >= 0 else order[:K + 1]
        assert indices[row].tolist() == expected
        assert_close(values[row].double(), log_p[expected], atol=1e-6, rtol=1e-6)
        assert_close(tail[row].double(), torch.log(1 - log_p[expected].exp().sum()), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="less the next-token column"):
        sparsify(logits, V, TAU, following)


def test_a_narrowed_next_token_store_equals_one_written_with_the_smaller_k(tmp_path):
    from kdistill.teachers.store import narrow_store

    with StoreWriter(tmp_path / "wide", k=K, temperature=TAU, fingerprints=FINGERPRINTS, dtype=torch.float32,
                     shard_size=4, next_token=True) as writer:
        for i, (sample_id, (logits, _)) in enumerate(items().items()):
            writer.add(sample_id, logits, next_tokens=next_tokens_of(len(logits), i))
        with pytest.raises(ValueError, match="needs next_tokens"):
            writer.add("no-next", torch.randn(2, V))
    wide = TeacherStore.open(tmp_path / "wide")
    assert (wide.k, wide.columns, wide.next_token) == (K, K + 1, True)
    narrow = TeacherStore.open(narrow_store(tmp_path / "wide", tmp_path / "narrow", k=2), verify=True)
    assert (narrow.k, narrow.columns, narrow.next_token) == (2, 3, True)
    for i, (sample_id, (logits, _)) in enumerate(items().items()):
        direct = sparsify(logits, 2, TAU, next_tokens_of(len(logits), i))
        entry = narrow[sample_id]
        assert torch.equal(entry.topk_indices.long(), direct[1].long())
        assert_close(entry.topk_logprobs, direct[0], atol=1e-6, rtol=1e-6)
        assert_close(entry.tail_logmass, direct[2], atol=1e-5, rtol=1e-5)


def test_a_vocabulary_past_int16_keeps_int32_indices(tmp_path):
    vocab = 40_000
    logits = torch.zeros(2, vocab)
    logits[0, 39_999] = logits[1, 32_768] = 9.0
    with StoreWriter(tmp_path / "big", k=1, fingerprints={}) as writer:
        writer.add("a", logits)
    entry = TeacherStore.open(tmp_path / "big")["a"]
    assert entry.topk_indices.dtype == torch.int32 and entry.topk_indices[:, 0].tolist() == [39_999, 32_768]


# ------------------------------------------------------------------------------ sampled stores

def test_sampled_tokens_estimate_the_teacher_without_bias():
    from kdistill.losses.sparse import sparse_divergence
    from kdistill.teachers.store_writer import sample_sparse

    logits = torch.randn(V, generator=torch.Generator().manual_seed(5)) * 2
    rows = 4000
    values, indices, tail = sample_sparse(logits.expand(rows, V), 6, TAU, torch.Generator().manual_seed(1))
    assert values.shape == indices.shape == (rows, 6) and torch.isneginf(tail).all()
    assert_close(values.exp().sum(-1), torch.ones(rows))  # counts / draws
    assert all(len(set(row)) == 6 for row in indices.tolist())  # distinct columns, unseen ones at -inf
    p = torch.softmax(logits / TAU, -1)
    estimate = torch.zeros(rows, V).scatter_add_(-1, indices.long(), values.exp()).mean(0)
    assert_close(estimate, p, atol=0.02, rtol=0)  # E[count / draws] = p; std of this mean is < 0.004
    # and so is the forward-KL gradient: d KL(p || q) / d z = (q - p) / τ for every row
    student = torch.randn(V, generator=torch.Generator().manual_seed(6)).expand(rows, V).clone().requires_grad_()
    sparse_divergence(student, values, indices, tail, "kl", temperature=TAU).backward()
    q = torch.softmax(student[0].detach() / TAU, -1)
    assert_close(student.grad.sum(0), (q - p) / TAU, atol=0.01, rtol=0)  # the loss is the mean over rows


def test_a_sampled_store_with_a_head_keeps_the_top_exactly_and_draws_the_rest_without_bias():
    from kdistill.teachers.store_writer import sample_sparse

    logits = torch.randn(V, generator=torch.Generator().manual_seed(5)) * 2
    rows, head = 4000, 3
    values, indices, tail = sample_sparse(logits.expand(rows, V), 5, TAU, torch.Generator().manual_seed(1), head)
    p = torch.softmax(logits / TAU, -1)
    top_p, top_i = p.topk(head)
    assert values.shape == indices.shape == (rows, head + 5) and torch.isneginf(tail).all()
    assert (indices[:, :head] == top_i).all()
    assert_close(values[:, :head].exp(), top_p.expand(rows, head))  # exact, no sampling noise
    assert_close(values.exp().sum(-1), torch.ones(rows))  # head + tail mass × counts / draws
    assert all(len(set(row)) == head + 5 for row in indices.tolist())  # no draw repeats a head token
    estimate = torch.zeros(rows, V).scatter_add_(-1, indices.long(), values.exp()).mean(0)
    assert_close(estimate, p, atol=0.01, rtol=0)
    # with no head it is the plain sampled store, draw for draw
    plain = sample_sparse(logits.expand(8, V), 5, TAU, torch.Generator().manual_seed(2))
    same = sample_sparse(logits.expand(8, V), 5, TAU, torch.Generator().manual_seed(2), 0)
    assert all(torch.equal(x, y) for x, y in zip(plain, same))
    # a head holding every token's mass leaves weightless draws outside it, not repeats of it
    sharp = torch.full((2, V), -1e4)
    sharp[:, :2] = 0.0
    values, indices, _ = sample_sparse(sharp, 4, 1.0, torch.Generator().manual_seed(3), 2)
    assert torch.isneginf(values[:, 2:]).all() and all(len(set(row)) == 6 for row in indices.tolist())


def test_a_sampled_store_is_reproducible_and_refuses_to_be_narrowed(tmp_path):
    from kdistill.teachers.store import narrow_store

    for name in ("a", "b"):
        with StoreWriter(tmp_path / name, k=3, temperature=TAU, fingerprints={}, sampled=True) as writer:
            for sample_id, (logits, _) in items().items():
                writer.add(sample_id, logits)
    a, b = TeacherStore.open(tmp_path / "a"), TeacherStore.open(tmp_path / "b")
    assert a.sampled and a.columns == 3 and not a.next_token
    for sample_id in items():
        assert torch.equal(a[sample_id].topk_indices, b[sample_id].topk_indices)
        assert torch.equal(a[sample_id].topk_logprobs, b[sample_id].topk_logprobs)
    with pytest.raises(CheckpointError, match="sampled tokens"):
        narrow_store(tmp_path / "a", tmp_path / "narrow", k=2)
    with pytest.raises(ValueError, match="no next-token column"):
        StoreWriter(tmp_path / "c", k=3, fingerprints={}, sampled=True, next_token=True)
    with pytest.raises(ValueError, match="head= is the exact top of a sampled store"):
        StoreWriter(tmp_path / "c", k=3, fingerprints={}, head=2)
    with StoreWriter(tmp_path / "h", k=3, temperature=TAU, fingerprints={}, sampled=True, head=2) as writer:
        for sample_id, (logits, _) in items().items():
            writer.add(sample_id, logits)
    with_head = TeacherStore.open(tmp_path / "h")
    assert with_head.columns == 5 and with_head.manifest["head"] == 2
    logits, _ = items()["sample-0"]
    assert torch.equal(with_head["sample-0"].topk_indices[:, :2].long(), logits.topk(2).indices)


def test_next_tokens_must_follow_the_text(tmp_path):
    with StoreWriter(tmp_path / "s", k=2, fingerprints={}, next_token=True) as writer:
        writer.add("empty", torch.zeros(0, V), next_tokens=torch.zeros(0, dtype=torch.long))
        for bad in (torch.tensor([1, 2, 3]), torch.tensor([1, -1, -1]), torch.tensor([1, -1])):
            with pytest.raises(ValueError, match="-1 at the last position only"):
                writer.add("bad", torch.randn(3, V), next_tokens=bad)
    assert TeacherStore.open(tmp_path / "s")["empty"].topk_indices.shape == (0, 3)
