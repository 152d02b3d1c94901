"""Writing a sparse teacher-logit store; the format and the reader are in :mod:`kdistill.teachers.store`.

Per position the writer keeps the k most likely tokens of softmax(logits / τ): their
log-probabilities (float16 or float32) and indices (int16 when the vocabulary fits, else int32), plus
the log of the remaining tail mass, log(1 − Σ top-k p), as float32 (one number per position; it sets
how much the sparse losses trust the top k).

A sampled store (``sampled=True``) keeps instead, per position, ``k`` tokens drawn from the teacher with
replacement, as distinct tokens with log(count / k): the forward-KL gradient against them is the full
teacher's in expectation (the loss value is not: the draws' entropy differs), where the top k are biased
toward the head (Anshumann et al. 2025, "Sparse Logit Sampling"). Its tail is empty (-inf); columns
beyond the distinct draws hold other tokens at -inf. With ``head=H`` it first keeps the teacher's H most
likely tokens exactly and draws the k tokens from the rest of its distribution, each worth
tail mass × count / k: still unbiased, with no sampling noise where most of the mass is.

A causal-LM store also keeps, per position, the token that comes next in the text (``next_token``): the
columns are then the k best tokens other than it, then it. Perplexity is the student's probability of
exactly that token, and with the top k alone a student learns it only as part of the tail bucket
whenever the teacher ranks it below k (measured: docs/teacher-store.md#measured).

Items are buffered and written as safetensors shards of about ``shard_size`` positions; an item never spans two shards. Per-item metadata ("extras", e.g. an augmentation
seed) must have the same names, shapes and dtypes for every item, so each becomes one stacked
tensor per shard instead of one header entry per item.

Everything is written in a hidden temporary directory next to ``path`` that :meth:`StoreWriter.close`
renames into place after writing the manifest last, so a killed run never leaves a directory that
looks like a finished store (only a ``.NAME.partial-*`` directory, safe to delete).
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from kdistill.engine.checkpoint import sha256
from kdistill.engine.disk import WRITE_ERRORS, raise_if_disk_full, remove_abandoned_copies, replace_folder
from kdistill.errors import CheckpointError, OutputError

Tensor = torch.Tensor

FORMAT = "kdistill-teacher-store"
VERSION = 2  # 2: int16 indices where the vocabulary fits, optional next-token column
READABLE_VERSIONS = (1, 2)
DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class TeacherEntry:
    """One item of the store: P positions, the store's columns (k, or k + 1 with the next token) each."""

    topk_logprobs: Tensor  # (P, columns), store dtype; top-k stores: sorted in decreasing order
    topk_indices: Tensor  # (P, columns) int16 or int32
    tail_logmass: Tensor  # (P,) float32, log of the mass outside the top k (-inf when k = V)
    extra: dict[str, Tensor] = field(default_factory=dict)


def sparsify(logits: Tensor, k: int, temperature: float = 1.0,
             next_tokens: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k log-probabilities of softmax(logits / τ), their indices, and log of the tail mass.

    With ``next_tokens`` ((P,), -1 where a position has none) each row keeps k + 1 columns: the k most
    likely tokens other than the next one, then the next one (where there is none, the (k + 1)-th).

    The tail is a logsumexp over the log-probabilities outside the kept columns, not log(1 − Σ top-k),
    which would cancel catastrophically when the top k hold nearly all of the mass.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    columns = k + (next_tokens is not None)
    if not 0 < columns <= logits.shape[-1]:
        raise ValueError(f"k must be in [1, {logits.shape[-1] - columns + k}] (the vocabulary size"
                         f"{', less the next-token column' if columns > k else ''}), got {k}")
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    if next_tokens is None:
        values, indices = log_p.topk(k, dim=-1)
    else:
        has = (next_tokens >= 0).unsqueeze(-1)
        target = next_tokens.clamp(min=0).long().unsqueeze(-1)
        others = log_p.scatter(-1, target, -math.inf).where(has, log_p)
        values, indices = others.topk(k + 1, dim=-1)
        values = torch.cat([values[:, :k], log_p.gather(-1, target).where(has, values[:, k:])], -1)
        indices = torch.cat([indices[:, :k], target.where(has, indices[:, k:])], -1)
    rest = log_p.scatter(-1, indices, -math.inf)
    empty = torch.isneginf(rest).all(-1, keepdim=True)  # k = V, or -inf logits outside the top k
    tail = torch.logsumexp(rest.masked_fill(empty, 0.0), dim=-1).masked_fill(empty.squeeze(-1), -math.inf)
    return values, indices.to(torch.int32), tail


def sample_sparse(logits: Tensor, draws: int, temperature: float = 1.0,
                  generator: torch.Generator | None = None, head: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``draws`` tokens per row from softmax(logits / τ), with replacement, as (log(count / draws), index)
    over ``draws`` distinct columns (columns past the distinct draws: other tokens at -inf) and an empty
    (-inf) tail. E[count / draws] is the teacher's probability, so the forward-KL gradient against it is unbiased.

    With ``head`` the first ``head`` columns are the most likely tokens with their exact log-probabilities,
    and the draws come from the rest renormalised, each count worth tail mass × count / draws."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if head < 0 or not 0 < draws <= logits.shape[-1] - head:
        raise ValueError(f"draws must be in [1, {logits.shape[-1] - max(head, 0)}] (the vocabulary size less the "
                         f"head of {head}), got {draws}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    top_p, top_i = probs.topk(head, dim=-1)
    mass = 1.0
    if head:  # in place: a store pass holds (positions × vocabulary) buffers, one more is a lot
        probs.scatter_(-1, top_i, 0.0)
        mass = probs.sum(-1, keepdim=True)
        if not torch.isfinite(mass).all():
            raise ValueError("the teacher's logits give non-finite probabilities; cannot sample from them")
        # a row whose head holds all the mass draws from the other tokens evenly, at weight 0
        empty = (mass == 0).squeeze(-1)
        if empty.any():
            probs[empty] = torch.ones_like(probs[empty]).scatter_(-1, top_i[empty], 0.0)
    drawn = torch.multinomial(probs, draws, replacement=True, generator=generator)
    counts = probs.zero_().scatter_add_(-1, drawn, torch.ones_like(drawn, dtype=probs.dtype))
    # the distinct draws first; zero counts are other tokens, never a head token (-1)
    counts, indices = counts.scatter_(-1, top_i, -1.0).topk(draws, dim=-1)
    values = torch.cat([top_p.log(), (counts.clamp(min=0) * mass / draws).log()], -1)
    indices = torch.cat([top_i, indices], -1)
    return values, indices.to(torch.int32), torch.full(counts.shape[:-1], -math.inf)


# ------------------------------------------------------------------------------------- writer

def manifest_field(path: str | Path | None, key: str):
    """One field of the manifest at `path`, or None where there is no readable one (opening the store names why)."""
    try:
        return json.loads((Path(path) / "manifest.json").read_text()).get(key) if path else None
    except (OSError, ValueError, AttributeError):
        return None


def is_store(path: Path) -> bool:
    """A folder whose manifest.json names this format: what a StoreWriter may replace."""
    return manifest_field(path, "format") == FORMAT


def refuse_unless_store(path: Path) -> None:
    """overwrite= replaces an earlier store, never a file or a folder of something else (a run, the user's own)."""
    if path.exists() and not is_store(path):
        what = "a file" if path.is_file() else "a folder that is not a teacher store (no store manifest.json)"
        raise CheckpointError(f"{path} exists and is {what}; a store replaces only an earlier store: pick another "
                              f"output path, or move that one away")


def partial_folder(path: Path) -> Path:
    """A new hidden folder beside `path` to write a store into; OutputError naming `path` where none can be made."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent))
    except OSError as err:
        why = ("a file stands where a folder on its path would be" if err.errno in (errno.EEXIST, errno.ENOTDIR)
               else err.strerror or str(err))
        raise OutputError(f"{path}: a teacher store cannot be written there ({why}); choose another output "
                          f"folder") from None


def check_store_output(path: Path) -> None:
    """Before the teacher runs: the output is an earlier store or free, and a store can be written beside it."""
    refuse_unless_store(path)
    shutil.rmtree(partial_folder(path))


class StoreWriter:
    """Collects items and writes shards of about ``shard_size`` positions.

    Use as a context manager (an exception inside removes the partial output) or call
    :meth:`close` explicitly; nothing appears at ``path`` before ``close`` succeeds.
    """

    def __init__(self, path: str | os.PathLike, *, k: int, temperature: float = 1.0,
                 fingerprints: Mapping[str, str], dtype: torch.dtype | str = torch.float16,
                 vocab_size: int | None = None, shard_size: int = 1 << 18, overwrite: bool = False,
                 next_token: bool = False, sampled: bool = False, head: int = 0):
        self.path = Path(path)
        dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype  # "float16" from a recipe
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be torch.float16 or torch.float32, got {dtype}")
        if k < 1 or temperature <= 0 or shard_size < 1:
            raise ValueError(f"need k >= 1, temperature > 0, shard_size >= 1; got {k}, {temperature}, {shard_size}")
        if vocab_size is not None and k > vocab_size:
            raise ValueError(f"k = {k} is larger than the vocabulary ({vocab_size})")
        if self.path.exists() and not overwrite:
            raise CheckpointError(f"{self.path} already exists; delete it or pass overwrite=True")
        refuse_unless_store(self.path)
        self.k, self.temperature, self.dtype, self.vocab_size = k, float(temperature), dtype, vocab_size
        if sampled and next_token:
            raise ValueError("a sampled store keeps no next-token column (its draws are already unbiased)")
        if head < 0 or (head and not sampled):
            raise ValueError(f"head= is the exact top of a sampled store, >= 0 (a top-k store is all head "
                             f"already); got {head} for a {'sampled' if sampled else 'top-k'} store")
        self.next_token, self.columns, self.sampled, self.head = next_token, k + next_token + head, sampled, head
        self._generator = torch.Generator().manual_seed(0)  # the draws of a sampled store replay exactly
        self.fingerprints = {str(name): str(value) for name, value in fingerprints.items()}
        self.shard_size, self.overwrite = shard_size, overwrite
        # Hidden and on the same filesystem as `path`, so the final rename is atomic.
        # The PID in the name lets a later writer remove what a killed one left (remove_abandoned_copies).
        self._tmp: Path | None = partial_folder(self.path)
        self._index: dict[str, list[int]] = {}
        self._shards: list[dict] = []
        self._extras: dict[str, dict] | None = None  # name -> {"dtype", "shape"}, fixed by the first item
        self._pending: list[TeacherEntry] = []
        self._pending_positions = 0
        self._positions = 0

    def add(self, sample_id: str, logits: Tensor, extra: Mapping[str, Tensor] | None = None,
            next_tokens: Tensor | None = None) -> None:
        """Add an item from its teacher logits, (P, V) or (V,) for a single position; a next-token store
        also needs each position's next token ((P,), -1 where there is none)."""
        logits = logits.unsqueeze(0) if logits.dim() == 1 else logits
        self._check_vocab(logits.shape[-1])
        if self.next_token != (next_tokens is not None):
            raise ValueError("a next-token store needs next_tokens with every item, any other store none")
        if next_tokens is not None and (next_tokens.shape != logits.shape[:1] or
                                        (len(next_tokens) and (next_tokens[-1] != -1 or (next_tokens[:-1] < 0).any()))):
            # narrow_store relies on it: the last position, and only it, has no next token
            raise ValueError(f"next_tokens of {sample_id!r} must be one token per position ({logits.shape[0]}), "
                             f"with -1 at the last position only; got {tuple(next_tokens.shape)}")
        if self.sampled:
            values, indices, tail = sample_sparse(logits, self.k, self.temperature, self._generator, self.head)
        else:
            values, indices, tail = sparsify(logits, self.k, self.temperature, next_tokens)
        self.add_topk(sample_id, values, indices, tail, extra)

    def add_topk(self, sample_id: str, topk_logprobs: Tensor, topk_indices: Tensor, tail_logmass: Tensor,
                 extra: Mapping[str, Tensor] | None = None) -> None:
        """Add an item whose top-k (at this store's temperature) the caller already computed."""
        if self._tmp is None:
            raise RuntimeError("StoreWriter is closed")
        if self.vocab_size is None:
            raise ValueError("pass vocab_size to StoreWriter before adding precomputed top-k values")
        sample_id = str(sample_id)
        if sample_id in self._index:
            raise ValueError(f"sample id {sample_id!r} was added twice")
        positions = topk_logprobs.shape[0]
        if (topk_logprobs.shape != (positions, self.columns) or topk_indices.shape != (positions, self.columns)
                or tail_logmass.shape != (positions,)):
            raise ValueError(f"expected top-k of shape (P, {self.columns}) and a tail of shape (P,), got "
                             f"{tuple(topk_logprobs.shape)}, {tuple(topk_indices.shape)}, {tuple(tail_logmass.shape)}")
        if positions and not 0 <= int(topk_indices.min()) <= int(topk_indices.max()) < self.vocab_size:
            raise ValueError(f"top-k indices of {sample_id!r} fall outside the vocabulary [0, {self.vocab_size})")
        extra = {name: value.detach().to("cpu") for name, value in (extra or {}).items()}
        self._check_extras(sample_id, extra)
        self._pending.append(TeacherEntry(topk_logprobs.detach().to("cpu", self.dtype),
                                          topk_indices.detach().to("cpu", torch.int32),
                                          tail_logmass.detach().to("cpu", torch.float32), extra))
        self._index[sample_id] = [len(self._shards), self._pending_positions, positions, len(self._pending) - 1]
        self._pending_positions += positions
        self._positions += positions
        if self._pending_positions >= self.shard_size:
            self._flush()

    def close(self) -> Path:
        """Write the last shard, the index and the manifest, then move the store into place."""
        if self._tmp is None:
            raise RuntimeError("StoreWriter is closed")
        if self._pending:
            self._flush()
        index = {"ids": list(self._index), "entries": list(self._index.values())}
        (self._tmp / "index.json").write_text(json.dumps(index))
        manifest = {
            "format": FORMAT, "version": VERSION, "k": self.k, "temperature": self.temperature,
            "columns": self.columns, "next_token": self.next_token, "sampled": self.sampled, "head": self.head,
            "dtype": str(self.dtype).removeprefix("torch."),
            "index_dtype": str(index_dtype(self.vocab_size)).removeprefix("torch."), "tail_dtype": "float32",
            "vocab_size": self.vocab_size, "num_items": len(self._index), "num_positions": self._positions,
            "fingerprints": self.fingerprints, "extras": self._extras or {},
            "index": {"file": "index.json", **_file_record(self._tmp / "index.json")},
            "shards": self._shards,
        }
        (self._tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if self.path.exists() and not self.overwrite:  # appeared while we were writing
            raise CheckpointError(f"{self.path} already exists; delete it or pass overwrite=True "
                                  f"(the finished store is left in {self._tmp})")
        refuse_unless_store(self.path)
        replace_folder(self._tmp, self.path)
        self._tmp = None
        remove_abandoned_copies(self.path, "partial")
        remove_abandoned_copies(self.path, "old")  # a writer killed between the two renames above
        return self.path

    def abort(self) -> None:
        """Delete everything written so far; safe to call twice."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _check_vocab(self, vocab_size: int) -> None:
        if self.vocab_size is None:
            self.vocab_size = vocab_size
        elif vocab_size != self.vocab_size:
            raise ValueError(f"logits have {vocab_size} entries, the store's vocabulary has {self.vocab_size}")

    def _check_extras(self, sample_id: str, extra: dict[str, Tensor]) -> None:
        schema = {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                  for name, t in sorted(extra.items())}
        if self._extras is None:
            self._extras = schema
        elif schema != self._extras:
            raise ValueError(f"extras of {sample_id!r} are {schema}, but earlier items had {self._extras}; "
                             "every item needs the same names, shapes and dtypes")

    def _flush(self) -> None:
        name = f"shard-{len(self._shards):05d}.safetensors"
        tensors = {
            "topk_logprobs": torch.cat([e.topk_logprobs for e in self._pending]),
            "topk_indices": torch.cat([e.topk_indices for e in self._pending]).to(index_dtype(self.vocab_size)),
            "tail_logmass": torch.cat([e.tail_logmass for e in self._pending]),
        }
        for extra_name in self._extras or {}:
            tensors[f"extra.{extra_name}"] = torch.stack([e.extra[extra_name] for e in self._pending])
        try:
            save_file({key: value.contiguous() for key, value in tensors.items()}, str(self._tmp / name),
                      metadata={"format": FORMAT})
        except WRITE_ERRORS as err:
            raise_if_disk_full(err, self.path, self._tmp, error=CheckpointError, what="the teacher store",
                               fix="Free some space and build it again (nothing of it is kept)")
            raise
        self._shards.append({"file": name, "items": len(self._pending), "positions": self._pending_positions,
                             **_file_record(self._tmp / name)})
        self._pending, self._pending_positions = [], 0


def index_dtype(vocab_size: int | None) -> torch.dtype:
    """int16 indices halve a store's size next to float16 values; a vocabulary past 32,767 needs int32."""
    return torch.int16 if vocab_size is not None and vocab_size <= torch.iinfo(torch.int16).max + 1 else torch.int32


def _file_record(path: Path) -> dict:
    return {"sha256": sha256(path), "bytes": path.stat().st_size}
