"""kdistill.teachers.store: round trip, sharding, extras, refusals, atomic writes, size report."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle

import pytest
import torch
from torch.testing import assert_close

from kdistill.errors import CheckpointError
from kdistill.teachers.store import (StoreWriter, TeacherStore, fingerprint_tensors, fingerprint_text,
                                     payload_bytes_per_position, sparsify, storage_report)

V, K, TAU = 12, 4, 2.0
FINGERPRINTS = {"teacher": "t-111", "tokenizer": "tok-222", "data": "d-333"}
LENGTHS = [3, 1, 4, 2, 5]  # 15 positions; shard_size=4 -> items never split, several shards


def items():
    gen = torch.Generator().manual_seed(0)
    return {f"sample-{i}": (torch.randn(n, V, generator=gen) * 3, torch.tensor(1000 + i))
            for i, n in enumerate(LENGTHS)}


def write(path, dtype=torch.float32, **kwargs):
    with StoreWriter(path, k=K, temperature=TAU, fingerprints=FINGERPRINTS, dtype=dtype, shard_size=4,
                     **kwargs) as writer:
        for sample_id, (logits, seed) in items().items():
            writer.add(sample_id, logits, extra={"seed": seed, "box": seed.repeat(2).float()})
    return path


@pytest.fixture
def store_path(tmp_path):
    return write(tmp_path / "store")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip(tmp_path, dtype):
    path = write(tmp_path / "store", dtype=dtype)
    store = TeacherStore.open(path, expect={**FINGERPRINTS, "k": K, "temperature": TAU}, verify=True)
    assert len(store) == len(LENGTHS) and set(store) == set(items())
    assert len(store.manifest["shards"]) > 1
    for sample_id, (logits, seed) in items().items():
        entry = store[sample_id]
        log_p = torch.log_softmax(logits.double() / TAU, -1)
        values, indices = log_p.topk(K, -1)
        assert entry.topk_logprobs.dtype == dtype and entry.topk_indices.dtype == torch.int16  # V fits int16
        assert entry.tail_logmass.dtype == torch.float32
        assert torch.equal(entry.topk_indices.long(), indices)
        tol = 1e-3 if dtype == torch.float16 else 1e-6
        assert_close(entry.topk_logprobs.double(), values, atol=tol, rtol=tol)
        expected_tail = torch.log(1 - values.exp().sum(-1))  # float64, far from cancellation here
        assert_close(entry.tail_logmass.double(), expected_tail, atol=1e-5, rtol=1e-5)
        assert entry.extra["seed"].dtype == torch.int64 and entry.extra["seed"].item() == seed.item()
        assert torch.equal(entry.extra["box"], seed.repeat(2).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_read_many_equals_the_items_one_by_one(tmp_path, dtype):
    """A batch read (one gather per shard from memory maps) gives each item's rows, in the order asked, across
    shards, with repeats, in the stored dtypes."""
    store = TeacherStore.open(write(tmp_path / "store", dtype=dtype))
    order = ["sample-4", "sample-0", "sample-2", "sample-0", "sample-1"]  # shards 2, 0, 1, 0, 0
    assert len({store._index[i][0] for i in order}) > 1
    logprobs, indices, tail, lengths = store.read_many(order)
    entries = [store[i] for i in order]
    assert lengths.tolist() == [LENGTHS[4], LENGTHS[0], LENGTHS[2], LENGTHS[0], LENGTHS[1]]
    assert logprobs.dtype == dtype and indices.dtype == torch.int16 and tail.dtype == torch.float32
    assert torch.equal(logprobs, torch.cat([e.topk_logprobs for e in entries]))
    assert torch.equal(indices, torch.cat([e.topk_indices for e in entries]))
    assert torch.equal(tail, torch.cat([e.tail_logmass for e in entries]))
    empty = store.read_many([])
    assert [t.shape[0] for t in empty] == [0, 0, 0, 0]
    with pytest.raises(KeyError, match="sample-9"):
        store.read_many(["sample-0", "sample-9"])
    assert pickle.loads(pickle.dumps(store)).read_many(["sample-3"])[3].tolist() == [LENGTHS[3]]


def test_read_many_checks_the_shard_first(store_path):
    flip_byte(store_path / "shard-00001.safetensors")
    store = TeacherStore.open(store_path)
    store.read_many(["sample-0", "sample-1"])  # shard 0 is intact
    with pytest.raises(CheckpointError, match=r"shard-00001\.safetensors is damaged"):
        store.read_many(["sample-0", "sample-2"])


def test_manifest_fields(store_path):
    manifest = json.loads((store_path / "manifest.json").read_text())
    assert manifest["format"] == "kdistill-teacher-store" and manifest["version"] == 2
    assert (manifest["k"], manifest["temperature"], manifest["vocab_size"]) == (K, TAU, V)
    assert manifest["num_items"] == len(LENGTHS) and manifest["num_positions"] == sum(LENGTHS)
    assert manifest["fingerprints"] == FINGERPRINTS and manifest["dtype"] == "float32"
    assert sum(shard["positions"] for shard in manifest["shards"]) == sum(LENGTHS)
    for shard in manifest["shards"]:
        assert (store_path / shard["file"]).stat().st_size == shard["bytes"] and len(shard["sha256"]) == 64


def test_precomputed_topk_and_single_position(tmp_path):
    logits = torch.randn(3, V)
    with StoreWriter(tmp_path / "s", k=K, temperature=TAU, fingerprints={}, vocab_size=V) as writer:
        writer.add_topk("a", *sparsify(logits, K, TAU))
        writer.add("b", logits[0])  # a 1-D row is one position (an image's class logits)
    store = TeacherStore.open(tmp_path / "s")
    assert_close(store["a"].topk_logprobs, sparsify(logits, K, TAU)[0].half())
    assert store["b"].topk_logprobs.shape == (1, K)
    with pytest.raises(KeyError, match="missing"):
        store["missing"]


def test_sparsify_full_vocabulary_has_empty_tail():
    values, indices, tail = sparsify(torch.randn(2, V), k=V)
    assert torch.isneginf(tail).all() and sorted(indices[0].tolist()) == list(range(V))


def test_writer_rejects_inconsistent_items(tmp_path):
    with pytest.raises(ValueError, match="twice"), StoreWriter(tmp_path / "s", k=K, fingerprints={}) as writer:
        writer.add("a", torch.randn(2, V))
        writer.add("a", torch.randn(2, V))
    with pytest.raises(ValueError, match="same names"), StoreWriter(tmp_path / "s", k=K, fingerprints={}) as writer:
        writer.add("a", torch.randn(2, V), extra={"seed": torch.tensor(1)})
        writer.add("b", torch.randn(2, V))
    with pytest.raises(ValueError, match="vocabulary"), StoreWriter(tmp_path / "s", k=K, fingerprints={}) as writer:
        writer.add("a", torch.randn(2, V))
        writer.add("b", torch.randn(2, V + 1))
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------ refusals

def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data, so the size stays the same
    path.write_bytes(bytes(data))


def test_flipped_byte_in_shard(store_path):
    flip_byte(store_path / "shard-00001.safetensors")
    store = TeacherStore.open(store_path)  # lazy: only the shard's size is checked at open
    store["sample-0"]  # shard 0 is intact
    with pytest.raises(CheckpointError, match=r"shard-00001\.safetensors is damaged"):
        store["sample-2"]
    with pytest.raises(CheckpointError, match=r"shard-00001\.safetensors"):
        TeacherStore.open(store_path, verify=True)


def test_a_manifest_edited_to_another_width_is_refused(store_path):
    manifest = json.loads((store_path / "manifest.json").read_text())
    manifest["k"] = manifest["columns"] = K - 2
    (store_path / "manifest.json").write_text(json.dumps(manifest))
    store = TeacherStore.open(store_path)
    for read in (lambda: store["sample-0"], lambda: store.read_many(["sample-0", "sample-1"])):
        with pytest.raises(CheckpointError, match=rf"manifest.json gives {K - 2} columns a position, "
                                                  rf"shard-00000.safetensors holds {K}"):
            read()
        store = TeacherStore.open(store_path)


def test_missing_shard(store_path):
    (store_path / "shard-00001.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard-00001\.safetensors is missing"):
        TeacherStore.open(store_path)


def test_truncated_shard(store_path):
    shard = store_path / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=r"shard-00000\.safetensors has"):
        TeacherStore.open(store_path)


def test_damaged_index(store_path):
    index = store_path / "index.json"
    index.write_text(index.read_text().replace("sample-0", "sample-9"))
    with pytest.raises(CheckpointError, match=r"index\.json is damaged"):
        TeacherStore.open(store_path)


def test_missing_manifest(store_path):
    (store_path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        TeacherStore.open(store_path)
    with pytest.raises(CheckpointError, match=r"index.json is a file; a teacher store is a folder"):
        TeacherStore.open(store_path / "index.json")  # not a NotADirectoryError traceback


def test_foreign_manifest(store_path):
    (store_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a kdistill teacher store"):
        TeacherStore.open(store_path)


@pytest.mark.parametrize("field, value, message", [
    ("teacher", "t-999", "teacher fingerprint differs: store has t-111, run has t-999"),
    ("tokenizer", "tok-0", "tokenizer fingerprint differs: store has tok-222, run has tok-0"),
    ("k", 8, "k differs: store has 4, run has 8"),
    ("temperature", 1.0, "temperature differs: store has 2.0, run has 1.0"),
    ("augmentation", "aug-1", "augmentation fingerprint differs: store has none, run has aug-1"),
])
def test_mismatched_expectation(store_path, field, value, message):
    with pytest.raises(CheckpointError, match="cache-teacher") as error:
        TeacherStore.open(store_path, expect={**FINGERPRINTS, "k": K, "temperature": TAU, field: value})
    assert message in str(error.value)


def test_a_store_without_the_data_halves_is_checked_by_the_whole_data_fingerprint(store_path):
    """Stores built before the records and the cut were recorded apart: the run's halves are not held against
    them, the whole fingerprint still is."""
    TeacherStore.open(store_path, expect={**FINGERPRINTS, "records": "r-1", "cut": "64"})
    with pytest.raises(CheckpointError, match=r"data fingerprint differs: store has d-333, run has d-9 \(the training "
                                              r"records, or how they are cut"):
        TeacherStore.open(store_path, expect={**FINGERPRINTS, "data": "d-9", "records": "r-1", "cut": "64"})


def test_every_mismatch_is_named(store_path):
    with pytest.raises(CheckpointError) as error:
        TeacherStore.open(store_path, expect={"teacher": "x", "data": "y", "k": 2})
    for name in ("teacher fingerprint", "data fingerprint", "k differs"):
        assert name in str(error.value)


# ------------------------------------------------------------------------------- atomic writes

def test_exception_inside_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="teacher crashed"):
        with StoreWriter(tmp_path / "s", k=K, fingerprints={}, shard_size=1) as writer:
            writer.add("a", torch.randn(3, V))  # already flushed to a shard in the temporary directory
            raise RuntimeError("teacher crashed")
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_no_store(tmp_path):
    writer = StoreWriter(tmp_path / "s", k=K, fingerprints={}, shard_size=1)
    writer.add("a", torch.randn(3, V))
    # The process dies here: close() never runs.
    assert not (tmp_path / "s").exists()
    with pytest.raises(CheckpointError, match=r"teacher store .*s does not exist; build one with `kdistill cache"):
        TeacherStore.open(tmp_path / "s")
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_finished_writer_removes_what_a_killed_one_left(tmp_path):
    dead = tmp_path / ".s.partial-999999999-abcd"  # no such process
    dead.mkdir()
    (tmp_path / f".s.partial-{os.getpid()}-mine").mkdir()  # a live process's (this one's): kept
    write(tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".s.partial-{os.getpid()}-mine", "s"])


def test_existing_store_needs_overwrite(store_path):
    with pytest.raises(CheckpointError, match="already exists"):
        StoreWriter(store_path, k=K, fingerprints={})
    with StoreWriter(store_path, k=2, fingerprints={}, overwrite=True) as writer:
        writer.add("only", torch.randn(1, V))
    assert TeacherStore.open(store_path).k == 2 and list(TeacherStore.open(store_path)) == ["only"]
    assert sorted(p.name for p in store_path.parent.iterdir()) == ["store"]


def test_overwrite_replaces_only_a_store(tmp_path):
    # a user's folder, a finished run or a file at the output path is refused before the teacher pass, untouched
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep")
    (tmp_path / "file").write_text("keep")
    (tmp_path / "other-json").mkdir()
    (tmp_path / "other-json" / "manifest.json").write_text('{"format": "something else"}')
    for path, what in ((folder, "not a teacher store"), (tmp_path / "file", "is a file"),
                       (tmp_path / "other-json", "not a teacher store")):
        with pytest.raises(CheckpointError, match=what):
            StoreWriter(path, k=2, fingerprints={}, overwrite=True)
    assert (folder / "notes.txt").read_text() == "keep" and (folder / "sub").is_dir()
    assert (tmp_path / "file").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine", "other-json"]  # no partial folder left
    # and at the end: a folder that appeared at the path while the store was being written
    writer = StoreWriter(tmp_path / "late", k=2, fingerprints={}, overwrite=True)
    writer.add("only", torch.randn(1, V))
    (tmp_path / "late").mkdir()
    with pytest.raises(CheckpointError, match="not a teacher store"):
        writer.close()
    writer.abort()
    assert list((tmp_path / "late").iterdir()) == []


# ------------------------------------------------------------------------------ helpers, report

def test_store_pickles_for_dataloader_workers(store_path):
    store = TeacherStore.open(store_path)
    store["sample-0"]  # opens a shard handle
    clone = pickle.loads(pickle.dumps(store))
    assert torch.equal(clone["sample-4"].topk_indices, store["sample-4"].topk_indices)


def test_storage_report(store_path):
    report = storage_report(TeacherStore.open(store_path))
    assert report.dense_bytes_per_position == V * 4
    assert report.payload_bytes_per_position == K * (4 + 2) + 4  # float32 values, int16 indices
    assert report.bytes_per_position > report.payload_bytes_per_position  # headers + index on top
    assert payload_bytes_per_position(64, torch.float16) == 64 * 6 + 4
    assert payload_bytes_per_position(65, torch.float16, torch.int16) == 65 * 4 + 4
    assert math.isclose(report.compression, V * 4 / report.bytes_per_position)
    assert storage_report(store_path) == report


def test_fingerprints():
    weights = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}
    base = fingerprint_tensors(weights)
    assert base == fingerprint_tensors(dict(reversed(list(weights.items()))))  # order of names is irrelevant
    assert base != fingerprint_tensors({**weights, "w": weights["w"] + 1e-3})
    assert base != fingerprint_tensors({**weights, "w": weights["w"].double()})
    assert base != fingerprint_tensors({**weights, "w": weights["w"].reshape(3, 2)})
    assert fingerprint_text("ab", "c") != fingerprint_text("a", "bc")
    # the rule written out (stores made by earlier versions are matched by it): sha256 of length-prefixed UTF-8 parts
    assert fingerprint_text("x", "é") == hashlib.sha256(b"1:x" + b"2:\xc3\xa9").hexdigest()


def test_writer_accepts_dtype_names_and_checks_indices(tmp_path):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        with StoreWriter(tmp_path / "s", k=2, fingerprints={}, dtype="float32", vocab_size=V) as writer:
            writer.add_topk("a", torch.zeros(1, 2), torch.tensor([[0, V]]), torch.zeros(1))
    assert not (tmp_path / "s").exists()


def test_a_narrowed_store_equals_one_written_with_the_smaller_k(tmp_path):
    from kdistill.teachers.store import narrow_store

    wide = write(tmp_path / "wide")
    (wide / "teacher").mkdir()
    (wide / "teacher" / "config.json").write_text("{}")
    narrow = TeacherStore.open(narrow_store(wide, tmp_path / "narrow", k=2), expect={**FINGERPRINTS, "k": 2},
                               verify=True)
    assert (tmp_path / "narrow" / "teacher" / "config.json").exists()
    for sample_id, (logits, seed) in items().items():
        direct = sparsify(logits, 2, TAU)
        entry = narrow[sample_id]
        assert torch.equal(entry.topk_indices.long(), direct[1].long())
        assert_close(entry.topk_logprobs, direct[0], atol=1e-6, rtol=1e-6)
        assert_close(entry.tail_logmass, direct[2], atol=1e-5, rtol=1e-5)
        assert entry.extra["seed"].item() == seed.item()
    with pytest.raises(CheckpointError, match="needs 1 <= k < 4"):
        narrow_store(wide, tmp_path / "wider", k=K)


def test_version_1_stores_open_and_unknown_versions_are_refused(store_path):
    manifest_file = store_path / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    for key in ("columns", "next_token", "sampled"):
        manifest.pop(key)
    manifest_file.write_text(json.dumps({**manifest, "version": 1}))  # as format 1 wrote it
    old = TeacherStore.open(store_path)
    assert (old.columns, old.next_token, old.sampled) == (K, False, False) and old["sample-0"].topk_indices.shape[1] == K
    manifest_file.write_text(json.dumps({**manifest, "version": 3}))
    with pytest.raises(CheckpointError, match="format version 3"):
        TeacherStore.open(store_path)


def test_the_largest_int16_vocabulary(tmp_path):
    from kdistill.teachers.store_writer import index_dtype

    assert index_dtype(32_768) == torch.int16 and index_dtype(32_769) == torch.int32
    logits = torch.zeros(1, 32_768)
    logits[0, 32_767] = 9.0
    with StoreWriter(tmp_path / "edge", k=1, fingerprints={}) as writer:
        writer.add("a", logits)
    assert TeacherStore.open(tmp_path / "edge")["a"].topk_indices.long().item() == 32_767
