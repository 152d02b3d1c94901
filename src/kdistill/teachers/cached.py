"""A teacher that runs once: `kdistill cache-teacher RECIPE` writes its top-k outputs to a store (built by
kdistill.teachers.store_build), and `teacher: {source: cache, path: DIR}` trains from that store without the
teacher's weights. Here: how records are keyed and fingerprinted, and how a run opens, checks and reads its store.

The store directory also holds the teacher's config and tokenizer (`teacher/`), which is all a student
built from config needs. Records are keyed by a hash of their text, so the same text always finds the
same entry (augmented copies included) and a changed text never finds a stale one.

Images with random views (TinyViT) are stored per view: the key is the image's hash and the epoch,
and each entry keeps the view's seed, so training replays exactly the views the teacher saw and checks
that it does.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kdistill.data.images import is_image_record
from kdistill.errors import CheckpointError, ConfigError, DataError, PairingError

TEACHER_FILES = "teacher"  # subfolder of a store: the teacher's config.json and tokenizer


def record_key(record: dict) -> str:
    if is_image_record(record):
        key = image_key(record)
        return key if record.get("epoch") is None else f"{key}@{record['epoch']}"
    text = record["text"] + ("\x00" + record["text_pair"] if "text_pair" in record else "")
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def image_key(record: dict) -> str:
    import numpy as np

    if "image" in record:
        pixels = np.ascontiguousarray(record["image"], dtype=np.float32)
        data = repr(pixels.shape).encode() + pixels.tobytes()
    else:  # the file's content, not its name: images overwritten in place must not find the old entries
        path = record["image_path"]
        try:
            stat = os.stat(path)
        except OSError as err:
            raise DataError(f"cannot read image {path}: {err.strerror or err}") from None
        data = _file_digest(path, stat.st_size, stat.st_mtime_ns)
    return hashlib.sha256(data).hexdigest()[:24]


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, size: int, mtime_ns: int) -> bytes:
    """Read once per file version (size and time stamp): a store's keys are looked up every batch."""
    return hashlib.sha256(Path(path).read_bytes()).digest()


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's vocabulary, or an image processor's settings: what turns a record into inputs."""
    from kdistill.teachers.fingerprint import fingerprint_text

    if tokenizer is None:  # an image model saved without its processor: the collator's settings (data_cut) decide
        return fingerprint_text("no processor")
    if not hasattr(tokenizer, "get_vocab"):
        return fingerprint_text(type(tokenizer).__name__, json.dumps(tokenizer.to_dict(), sort_keys=True, default=str))
    vocab = sorted(tokenizer.get_vocab().items())
    return fingerprint_text(type(tokenizer).__name__, json.dumps(vocab))


def data_cut(stage, collator=None) -> str:
    """How records become inputs: the text cut, or the image size, channels and the random views."""
    data = stage.data
    size = getattr(collator, "image_size", None)
    if size is None:
        return str(data.max_length)
    views = data.image_augment.model_dump(mode="json") if data.image_augment else None
    return json.dumps({"image_size": size, "channels": collator.channels, "mean": collator.mean, "std": collator.std,
                       "views": views}, sort_keys=True)


def view_epochs(stage, num_records: int) -> int:
    """Epochs of random views a stage draws: its store holds one view of each image per epoch."""
    if stage.data.image_augment is None:
        return 0
    return math.ceil(stage.train.steps * stage.train.batch_size / num_records)


def data_fingerprints(records: list[dict], cut: str) -> dict[str, str]:
    """Which records (as keys, in a set) and how they were cut, so a store built for other data is refused: the
    whole ("data"), and its two halves apart so that a refusal can say which one differs, the records (hashed)
    and the cut (as it is: a max_length, or the image settings)."""
    from kdistill.teachers.fingerprint import fingerprint_text

    keys = sorted({record_key(r) for r in records})  # each a hash of a record's text: made once
    return {"data": fingerprint_text(cut, *keys), "records": fingerprint_text("records", *keys), "cut": cut}


def kd_temperature(stage) -> float:
    """The temperature of the stage's logit loss: the store must hold the teacher at that temperature."""
    temps = {getattr(p, "temperature", None) for p in stage.losses} - {None}
    if len(temps) > 1:
        raise ConfigError(f"the stage's logit losses use several temperatures {sorted(temps)}; a store holds one")
    return temps.pop() if temps else 1.0


@dataclass
class SparseLogits:
    """Teacher logits as the store keeps them, padded to the batch: (B[, L], k) and (B[, L])."""

    logprobs: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor
    temperature: float
    sampled: bool = False  # tokens drawn from the teacher (unbiased for forward KL only), not its top k

    def detach(self) -> "SparseLogits":
        return self


def open_for_stage(stage, tokenizer, records: list[dict], where: str, collator=None):
    """The stage's store, refused if it was built for another tokenizer, data, cut or temperature."""
    from kdistill.teachers.store import TeacherStore

    expect = {"tokenizer": tokenizer_fingerprint(tokenizer), **data_fingerprints(records, data_cut(stage, collator)),
              "temperature": kd_temperature(stage)}
    try:
        return TeacherStore.open(stage.teacher.path, expect=expect)
    except CheckpointError as err:
        raise CheckpointError(f"{where}teacher.path: {err}") from None


IDENTITY_KEYS = ("model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer",
                 "num_attention_heads", "n_head", "intermediate_size")
"""What a model's config says about which model it is, for :func:`check_store_teacher` (not its labels: a store
of a classifier may hold a head made for the data's classes, and those are checked against the data anyway)."""


def check_store_teacher(model_ref: str, store_teacher_dir: str, where: str, trust_remote_code: bool = False) -> None:
    """``teacher.model`` named beside ``teacher.path``: the store must have been built from that model. Its config
    and tokenizer are compared with the copies the store keeps; its weights are not read (that is a pass over the
    teacher's files, which a store exists to spare; the manifest keeps their fingerprint). A ``recipe:NAME`` teacher
    that is not trained yet is not trained for this."""
    from kdistill.models.loading import load_config, load_tokenizer
    from kdistill.teachers.recipe_runs import PREFIX, trained_recipe

    ref = str(model_ref)
    if ref.startswith("stage:"):  # an earlier stage's student: `kdistill run` resolves it, `validate` cannot yet
        return
    if ref.startswith(PREFIX):
        trained = trained_recipe(ref)
        if trained is None:
            return
        ref = str(trained)
    path, named = load_config(ref, trust_remote_code)
    stored = load_config(store_teacher_dir, trust_remote_code)[1].to_dict()
    named = named.to_dict()
    for key in IDENTITY_KEYS:
        if named.get(key) != stored.get(key):
            raise PairingError(f"{where}teacher: the store at teacher.path was built from another model than "
                               f"teacher.model {model_ref!r}: its {key} is {stored.get(key)!r}, the model's "
                               f"{named.get(key)!r}; name the model the store came from, leave teacher.model out, or "
                               f"build a store of this one (`kdistill cache-teacher`)")
    if (tokenizer_fingerprint(load_tokenizer(path, trust_remote_code))
            != tokenizer_fingerprint(load_tokenizer(store_teacher_dir, trust_remote_code))):
        raise PairingError(f"{where}teacher: the store at teacher.path was built with another tokenizer than "
                           f"teacher.model {model_ref!r}'s; name the model the store came from, leave teacher.model "
                           f"out, or build a store of this one (`kdistill cache-teacher`)")


def sparse_batch(store, records: list[dict], attention_mask: torch.Tensor | None, per_token: bool) -> SparseLogits:
    """The stored entries of a batch's records, padded to the batch's shape (read in one gather per shard)."""
    keys = [stored_key(store, r) for r in records]
    logprobs, indices, tail, lengths = store.read_many(keys)
    logprobs, indices = logprobs.float(), indices.long()
    if not per_token:
        return SparseLogits(logprobs, indices, tail, store.temperature, store.sampled)
    expected = attention_mask.sum(1).to(lengths.dtype)
    wrong = (lengths != expected).nonzero()
    if len(wrong):
        row = int(wrong[0])
        raise CheckpointError(f"the teacher store has {int(lengths[row])} positions for a record the run tokenizes "
                              f"into {int(expected[row])}; rebuild it with `kdistill cache-teacher`")
    # right-padded: each record's positions are the first of its row, in the order read_many returns them
    kept = torch.arange(attention_mask.shape[1])[None] < lengths[:, None]
    shape = (*kept.shape, logprobs.shape[-1])
    padded = (torch.zeros(shape), torch.zeros(shape, dtype=torch.long), torch.zeros(kept.shape))
    for target, values in zip(padded, (logprobs, indices, tail)):
        target[kept] = values
    return SparseLogits(*padded, store.temperature, store.sampled)


def stored_key(store, record: dict) -> str:
    """The record's key, checked: it is in the store, and a replayed image view is the one the teacher saw."""
    key = record_key(record)
    if "view_seed" in record or key not in store:
        stored_entry(store, record)  # raises for a missing record or another view, naming it
    return key


def stored_entry(store, record: dict):
    key = record_key(record)
    if key not in store:
        epoch = f" in epoch {record['epoch']}" if record.get("epoch") is not None else ""
        raise CheckpointError(f"the teacher store has no entry for record {record.get('id', key)}{epoch}: it was built "
                              f"for other data or fewer steps; rebuild it with `kdistill cache-teacher`")
    entry = store[key]
    if "view_seed" in record:  # the replayed view must be the one the teacher saw
        stored = int(entry.extra["view_seed"].reshape(-1)[0]) if "view_seed" in entry.extra else None
        if stored != record["view_seed"]:
            raise CheckpointError(f"record {record.get('id', key)} epoch {record.get('epoch')}: the store holds the "
                                  f"teacher's output for view seed {stored}, training draws {record['view_seed']}; "
                                  f"rebuild the store with the recipe's data.image_augment")
    return entry
