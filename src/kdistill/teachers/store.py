"""Sparse teacher-logit store ("teacher cache"): open, verify and read one; the public API.

Running the teacher once and storing its output lets every later epoch, student and seed train
without it. Full logits cost V·4 bytes per position (600 kB at V = 150k), so a store keeps per
position only the teacher's top-k log-probabilities, their indices and the log of the remaining
tail mass (:mod:`kdistill.teachers.store_writer` writes it; :mod:`kdistill.losses.sparse` trains
against it). Layout of a store directory::

    manifest.json            format + version, k, temperature, dtypes, vocab size, item and
                             position counts, caller fingerprints, extras schema, and the sha256 +
                             byte size of every other file (written last)
    index.json               {"ids": [...], "entries": [[shard, first row, positions, item slot], ...]}
    shard-00000.safetensors  topk_logprobs (N, c), topk_indices (N, c) int16/int32, tail_logmass (N,) float32,
                             extra.<name> (items in shard, *shape) for each per-item metadata tensor;
                             c = k, or k + 1 in a next-token store (the k best others, then the next token)

Opening checks the manifest, the caller's expectations (fingerprints, k, temperature) and that
every shard exists with its recorded size. Shard checksums cost a full read, so they are checked
on a shard's first access, or all at once with ``verify=True``. Every failure is a
:class:`~kdistill.errors.CheckpointError` that names the field or file at fault.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from kdistill.engine.checkpoint import sha256
from kdistill.errors import CheckpointError
from kdistill.teachers.fingerprint import fingerprint_tensors, fingerprint_text
from kdistill.teachers.store_writer import (DTYPES, FORMAT, READABLE_VERSIONS, VERSION, StoreWriter, TeacherEntry,
                                            sparsify)

__all__ = ["TeacherStore", "StoreWriter", "TeacherEntry", "StorageReport", "storage_report",
           "payload_bytes_per_position", "sparsify", "fingerprint_tensors", "fingerprint_text", "FORMAT", "VERSION"]

REBUILD_HINT = "rebuild it with `kdistill cache-teacher`"
API_RECORD = "kdistill-api-teacher.json"  # beside the teacher files of a store `kdistill cache-api-teacher` wrote
_MANIFEST_FIELDS = ("k", "temperature", "vocab_size")  # `expect` keys compared with the manifest itself


class TeacherStore:
    """Read-only view of a store directory; ``store[sample_id]`` is a :class:`TeacherEntry`."""

    def __init__(self, path: Path, manifest: dict, index: dict[str, tuple[int, int, int, int]]):
        self.path, self.manifest, self._index = path, manifest, index
        self._handles: dict[int, object] = {}  # shard number -> open safe_open handle (memory-mapped)
        self._maps: dict[int, dict[str, np.ndarray]] = {}  # shard number -> its tensors as read-only memory maps
        self._verified: set[int] = set()

    @classmethod
    def open(cls, path: str | os.PathLike, expect: Mapping[str, object] | None = None, *,
             verify: bool = False) -> TeacherStore:
        """Open the store at ``path``, refusing it if it does not match ``expect``.

        ``expect`` maps "k", "temperature" and "vocab_size" to the values the run needs, and any
        other name (teacher, tokenizer, data, ...) to the fingerprint the run computed for it.
        """
        path = Path(path)
        manifest = _read_manifest(path)
        _check_expectations(path, manifest, expect or {})
        for record in [manifest["index"], *manifest["shards"]]:
            _check_present(path, record)
        index_file = path / manifest["index"]["file"]
        if sha256(index_file) != manifest["index"]["sha256"]:
            raise CheckpointError(f"teacher store {path} is corrupt: {index_file.name} is damaged "
                                  f"(checksum mismatch); {REBUILD_HINT}")
        raw = json.loads(index_file.read_text())
        store = cls(path, manifest, {sid: tuple(entry) for sid, entry in zip(raw["ids"], raw["entries"])})
        if verify:
            store.verify()
        return store

    # Properties the loss side needs to check its own settings against.
    k = property(lambda self: self.manifest["k"])
    columns = property(lambda self: _columns(self.manifest))
    next_token = property(lambda self: bool(self.manifest.get("next_token", False)))
    sampled = property(lambda self: bool(self.manifest.get("sampled", False)))
    temperature = property(lambda self: self.manifest["temperature"])
    vocab_size = property(lambda self: self.manifest["vocab_size"])
    dtype = property(lambda self: DTYPES[self.manifest["dtype"]])
    fingerprints = property(lambda self: dict(self.manifest["fingerprints"]))
    num_positions = property(lambda self: self.manifest["num_positions"])

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __getitem__(self, sample_id: str) -> TeacherEntry:
        try:
            shard, offset, length, slot = self._index[sample_id]
        except KeyError:
            raise KeyError(f"sample id {sample_id!r} is not in the teacher store {self.path}") from None
        handle = self._shard(shard)
        rows = slice(offset, offset + length)
        extra = {name: handle.get_slice(f"extra.{name}")[slot:slot + 1][0] for name in self.manifest["extras"]}
        return TeacherEntry(handle.get_slice("topk_logprobs")[rows], handle.get_slice("topk_indices")[rows],
                            handle.get_slice("tail_logmass")[rows], extra)

    def read_many(self, sample_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every position of these items, concatenated in their order: (log-probabilities (N, columns), indices
        (N, columns), tail log-masses (N,), each item's position count). One gather per shard and field from the
        memory-mapped shard, where ``store[id]`` costs three safetensors slices per item (0.2 ms each, 7 ms for a
        batch of 32 here: a fifth of a small model's GPU step)."""
        try:
            spans = [self._index[sample_id] for sample_id in sample_ids]
        except KeyError as err:
            raise KeyError(f"sample id {err.args[0]!r} is not in the teacher store {self.path}") from None
        shards, offsets, lengths = (np.array([span[i] for span in spans], dtype=np.int64).reshape(-1) for i in range(3))
        starts = np.cumsum(lengths) - lengths  # where each item's rows go in the output
        total, columns = int(lengths.sum()), self.columns
        out = {"topk_logprobs": torch.empty(total, columns, dtype=self.dtype),
               "topk_indices": torch.empty(total, columns, dtype=getattr(torch, self.manifest.get("index_dtype", "int32"))),
               "tail_logmass": torch.empty(total)}
        for shard in np.unique(shards):
            arrays, chosen = self._arrays(int(shard)), shards == shard
            rows, places = _ranges(offsets[chosen], lengths[chosen]), _ranges(starts[chosen], lengths[chosen])
            for name, target in out.items():
                target.numpy()[places] = arrays[name][rows]
        return (*out.values(), torch.from_numpy(lengths))

    def verify(self) -> None:
        """Check every shard's checksum now instead of on first access."""
        for number in range(len(self.manifest["shards"])):
            self._verify_shard(number)

    def close(self) -> None:
        self._handles.clear()
        self._maps.clear()

    def __getstate__(self) -> dict:
        # safe_open handles and memory maps cannot be pickled (DataLoader workers); a worker reopens lazily.
        return {**self.__dict__, "_handles": {}, "_maps": {}}

    def _verify_shard(self, number: int) -> None:
        if number in self._verified:
            return
        record = self.manifest["shards"][number]
        _check_present(self.path, record)
        if sha256(self.path / record["file"]) != record["sha256"]:
            raise CheckpointError(f"teacher store {self.path} is corrupt: {record['file']} is damaged "
                                  f"(checksum mismatch); {REBUILD_HINT}")
        width = _tensor_shapes(self.path / record["file"]).get("topk_logprobs", [0, None])[-1]
        if width != self.columns:  # an edited manifest: the rows would be read at the wrong width
            raise CheckpointError(f"teacher store {self.path} is corrupt: manifest.json gives {self.columns} columns a "
                                  f"position, {record['file']} holds {width}; {REBUILD_HINT}")
        self._verified.add(number)

    def _shard(self, number: int):
        if number not in self._handles:
            self._verify_shard(number)
            self._handles[number] = safe_open(str(self.path / self.manifest["shards"][number]["file"]), framework="pt")
        return self._handles[number]

    def _arrays(self, number: int) -> dict[str, np.ndarray]:
        if number not in self._maps:
            self._verify_shard(number)
            self._maps[number] = _memory_map(self.path / self.manifest["shards"][number]["file"])
        return self._maps[number]


_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "I16": np.int16, "I32": np.int32, "I64": np.int64}


def _header(file: Path) -> tuple[int, dict]:
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return size, json.loads(handle.read(size))


def _tensor_shapes(file: Path) -> dict[str, list[int]]:
    return {name: info["shape"] for name, info in _header(file)[1].items() if name != "__metadata__"}


def _memory_map(file: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors as read-only numpy memory maps. safetensors' own reader hands out contiguous
    slices only; a batch wants scattered rows, and fancy indexing a map reads just those. The layout is the
    format's published one: an 8-byte little-endian header size, the JSON header, then the data."""
    size, header = _header(file)
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + size)
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        arrays[name] = data[begin:end].view(_NUMPY_DTYPES[info["dtype"]]).reshape(info["shape"])
    return arrays


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of arange(start, start + length) for each pair, without a Python loop."""
    total = int(lengths.sum())
    return np.arange(total) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)


def _columns(manifest: dict) -> int:
    return manifest.get("columns", manifest["k"])  # format 1 kept exactly k


def _read_manifest(path: Path) -> dict:
    file = path / "manifest.json"
    if not path.exists():
        raise CheckpointError(f"teacher store {path} does not exist; build one with `kdistill cache-teacher RECIPE`")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a teacher store is a folder (manifest.json and shards) that "
                              f"`kdistill cache-teacher` writes")
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a finished teacher store (no manifest.json); {REBUILD_HINT}") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"{file} is corrupt (not JSON); {REBUILD_HINT}") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a kdistill teacher store (format {manifest.get('format')!r})")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"teacher store {path} has format version {manifest.get('version')}, this kdistill "
                              f"reads versions {', '.join(map(str, READABLE_VERSIONS))}; {REBUILD_HINT}")
    return manifest


def _check_expectations(path: Path, manifest: dict, expect: Mapping[str, object]) -> None:
    """One error listing every field where the store and the run disagree."""
    problems: dict[str, str] = {}  # field name -> what differs
    stored = manifest["fingerprints"]
    for name, wanted in expect.items():
        if name in _MANIFEST_FIELDS:
            have = manifest.get(name)
            same = have is not None and wanted is not None and math.isclose(float(have), float(wanted), rel_tol=1e-9)
            label = name
        else:
            have = stored.get(name)
            if have is None and name in DATA_HALVES:  # a store built before they were recorded apart
                continue
            same = have == wanted
            label = "data cut" if name == "cut" else f"{name} fingerprint"
        if not same:
            problems[name] = (f"{label} differs: store has {'none' if have is None else have}, run has {wanted}"
                              + WHAT_DIFFERS.get(name, ""))
    if problems.keys() & set(DATA_HALVES):  # the whole differs because a half does, and the half says which
        problems.pop("data", None)
    if problems:
        from kdistill.teachers.cached import TEACHER_FILES

        api = (path / TEACHER_FILES / API_RECORD).exists()
        hints = []
        if api and "temperature" in problems:  # a rebuild writes temperature 1 again
            hints.append("a service's log-probabilities are at temperature 1: set temperature: 1.0 on the loss")
        if not api or problems.keys() != {"temperature"}:
            hints.append("rebuild it with `kdistill cache-api-teacher`" if api else REBUILD_HINT)
        raise CheckpointError(f"teacher store {path} does not match this run: {'; '.join([*problems.values(), *hints])}")


# a fingerprint is a hash: what it covers, so a mismatch says where to look
DATA_HALVES = ("records", "cut")  # recorded apart from "data" since 2026-11-29
WHAT_DIFFERS = {"data": " (the training records, or how they are cut: data.max_length)",
                "records": " (the training records: another file, split, limit, sample or augmentation)",
                "cut": " (how the records are cut: data.max_length, or the images' size, channels and views)",
                "tokenizer": " (the teacher's tokenizer)", "teacher": " (the teacher's weights or model)"}


def _check_present(path: Path, record: dict) -> None:
    """Cheap existence + size check, so a missing or truncated file fails at open, not mid-epoch."""
    file = path / record["file"]
    if not file.exists():
        raise CheckpointError(f"teacher store {path} is incomplete: {record['file']} is missing; {REBUILD_HINT}")
    if file.stat().st_size != record["bytes"]:
        raise CheckpointError(f"teacher store {path} is corrupt: {record['file']} has {file.stat().st_size} bytes, "
                              f"the manifest says {record['bytes']}; {REBUILD_HINT}")


# --------------------------------------------------------------------------------- size report

@dataclass(frozen=True)
class StorageReport:
    """Bytes per position of a store against dense float32 teacher logits."""

    bytes_per_position: float  # measured: shard + index bytes on disk / stored positions
    payload_bytes_per_position: int  # columns·(value bytes + index bytes) + 4 tail bytes, no overhead
    dense_bytes_per_position: int  # V·4, full float32 logits

    @property
    def compression(self) -> float:
        """How many times smaller than dense logits the store is on disk."""
        return self.dense_bytes_per_position / self.bytes_per_position


def payload_bytes_per_position(columns: int, dtype: torch.dtype = torch.float16,
                               indices: torch.dtype = torch.int32) -> int:
    """What one position costs in a store before headers and the index."""
    value_bytes = torch.empty((), dtype=dtype).element_size()
    return columns * (value_bytes + torch.empty((), dtype=indices).element_size()) + 4


def storage_report(store: TeacherStore | str | os.PathLike) -> StorageReport:
    manifest = store.manifest if isinstance(store, TeacherStore) else _read_manifest(Path(store))
    total = manifest["index"]["bytes"] + sum(shard["bytes"] for shard in manifest["shards"])
    payload = payload_bytes_per_position(_columns(manifest), DTYPES[manifest["dtype"]],
                                         getattr(torch, manifest.get("index_dtype", "int32")))
    return StorageReport(bytes_per_position=total / max(manifest["num_positions"], 1),
                         payload_bytes_per_position=payload,
                         dense_bytes_per_position=(manifest["vocab_size"] or 0) * 4)


def narrow_store(source: str | os.PathLike, out: str | os.PathLike, k: int) -> Path:
    """A copy of the store at ``source`` keeping only each position's top ``k`` (< the store's k), and the
    next-token column where it has one: the dropped log-probabilities join the tail, so it equals a store
    written with ``k`` from the start (to the stored dtype) without running the teacher again. Per-item
    extras, fingerprints and the teacher files beside the store are carried over; a store already at ``out`` is replaced, as
    `kdistill cache-teacher` replaces one."""
    import shutil

    if Path(out).resolve() == Path(source).resolve():
        raise CheckpointError(f"narrowing {source} into itself would lose the wider store; give another output")
    store = TeacherStore.open(source, verify=True)
    if store.sampled:
        store.close()
        raise CheckpointError(f"{store.path} holds sampled tokens, not a top k; build a store with fewer draws instead")
    if not 1 <= k < store.k:
        store.close()
        raise CheckpointError(f"narrowing {store.path} (k = {store.k}) needs 1 <= k < {store.k}, got {k}")
    with StoreWriter(out, k=k, temperature=store.temperature, fingerprints=store.fingerprints, dtype=store.dtype,
                     vocab_size=store.vocab_size, overwrite=True, next_token=store.next_token) as writer:
        kept = torch.cat([torch.arange(k), torch.arange(store.k, store.columns)])  # the next token stays last
        for sample_id in store:
            entry = store[sample_id]
            dropped = entry.topk_logprobs[:, k:store.k].float()
            tail = torch.logsumexp(torch.cat([entry.tail_logmass[:, None], dropped], 1), 1)
            values, indices = entry.topk_logprobs[:, kept], entry.topk_indices[:, kept]
            if store.next_token and len(tail):  # an item's last position has no next token (cache_stage writes
                # -1 there): its columns are the k + 1 best, and a pass at k keeps its k + 1 best
                values[-1], indices[-1] = entry.topk_logprobs[-1, :k + 1], entry.topk_indices[-1, :k + 1]
                tail[-1] = torch.logsumexp(torch.cat([entry.tail_logmass[-1:], entry.topk_logprobs[-1, k + 1:].float()]), 0)
            writer.add_topk(sample_id, values, indices, tail, entry.extra)
    store.close()
    for extra in Path(source).iterdir():  # what was written beside the store (its teacher's config, tokenizer)
        if extra.is_dir():
            shutil.copytree(extra, Path(out) / extra.name, dirs_exist_ok=True)
    return Path(out)
