"""A teacher that runs once: `kdistill cache-teacher RECIPE` writes its top-k outputs to a store, and
`teacher: {source: cache, path: DIR}` trains from that store without the teacher's weights.

The store directory also holds the teacher's config and tokenizer (`teacher/`), which is all a student
built from config needs. Records are keyed by a hash of their text, so the same text always finds the
same entry (augmented copies included) and a changed text never finds a stale one.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kdistill.errors import CheckpointError, ConfigError

TEACHER_FILES = "teacher"  # subfolder of a store: the teacher's config.json and tokenizer


def record_key(record: dict) -> str:
    text = record["text"] + ("\x00" + record["text_pair"] if "text_pair" in record else "")
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer) -> str:
    from kdistill.teachers.fingerprint import fingerprint_text

    vocab = sorted(tokenizer.get_vocab().items())
    return fingerprint_text(type(tokenizer).__name__, json.dumps(vocab))


def data_fingerprint(records: list[dict], max_length: int) -> str:
    """Which texts (as keys, in a set) and how they were cut: a store built for other data is refused."""
    from kdistill.teachers.fingerprint import fingerprint_text

    return fingerprint_text(str(max_length), *sorted({record_key(r) for r in records}))


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

    def detach(self) -> "SparseLogits":
        return self


def cache_teacher(recipe, stage_index: int = 0, k: int = 64, out: str | None = None, batch_size: int = 32,
                  temperature: float | None = None, dtype: str = "float16", console=None) -> Path:
    """Run the stage's teacher over its training records once and write the store."""
    from rich.progress import Progress

    from kdistill.data import TextCollator
    from kdistill.engine.build import read_sources
    from kdistill.models.loading import load_model
    from kdistill.teachers.fingerprint import fingerprint_tensors
    from kdistill.teachers.recipe_runs import resolve_teacher
    from kdistill.teachers.store import StoreWriter

    if not 0 <= stage_index < len(recipe.stages):
        raise ConfigError(f"--stage {stage_index}: the recipe has stages 0..{len(recipe.stages) - 1}")
    stage = recipe.stages[stage_index]
    if stage.teacher.source != "live":
        raise ConfigError("cache-teacher needs a recipe whose teacher is a model (teacher.source: live)")
    temperature = kd_temperature(stage) if temperature is None else temperature
    records = read_sources(stage.data.train, "train", "data.train", stage.train.seed)
    loaded = load_model(resolve_teacher(stage.teacher.model, console), stage.teacher.task,
                        stage.teacher.trust_remote_code)
    teacher = loaded.model.eval()
    collator = TextCollator(loaded.tokenizer, stage.data.max_length)
    out = Path(out or Path(recipe.output) / "teacher-store")
    fingerprints = {"teacher": fingerprint_tensors(teacher.state_dict()),
                    "tokenizer": tokenizer_fingerprint(loaded.tokenizer),
                    "data": data_fingerprint(records, stage.data.max_length)}
    unique = list({record_key(r): r for r in records}.items())
    vocab = teacher.config.get_text_config().vocab_size if loaded.task == "causal-lm" else teacher.config.num_labels
    with StoreWriter(out, k=min(k, vocab), temperature=temperature, fingerprints=fingerprints, dtype=dtype,
                     vocab_size=vocab, overwrite=True) as writer, torch.inference_mode(), \
            Progress(disable=console is None) as progress:
        task = progress.add_task("teacher over the training data", total=len(unique))
        for start in range(0, len(unique), batch_size):
            chunk = unique[start:start + batch_size]
            batch = collator([r for _, r in chunk])
            logits = teacher(**batch).logits.float()
            for row, (key, _) in enumerate(chunk):
                if logits.dim() == 2:  # one distribution per sequence
                    writer.add(key, logits[row])
                else:
                    writer.add(key, logits[row, : int(batch["attention_mask"][row].sum())])
            progress.advance(task, len(chunk))
    teacher.config.save_pretrained(out / TEACHER_FILES)
    loaded.tokenizer.save_pretrained(out / TEACHER_FILES)
    return out


def open_for_stage(stage, tokenizer, records: list[dict], where: str):
    """The stage's store, refused if it was built for another tokenizer, data, cut or temperature."""
    from kdistill.teachers.store import TeacherStore

    expect = {"tokenizer": tokenizer_fingerprint(tokenizer), "data": data_fingerprint(records, stage.data.max_length),
              "temperature": kd_temperature(stage)}
    try:
        return TeacherStore.open(stage.teacher.path, expect=expect)
    except CheckpointError as err:
        raise CheckpointError(f"{where}teacher.path: {err}") from None


def sparse_batch(store, records: list[dict], attention_mask: torch.Tensor | None, per_token: bool) -> SparseLogits:
    """The stored entries of a batch's records, padded to the batch's shape."""
    entries = [store[record_key(r)] for r in records]
    k = entries[0].topk_logprobs.shape[-1]
    if not per_token:
        return SparseLogits(torch.stack([e.topk_logprobs[0].float() for e in entries]),
                            torch.stack([e.topk_indices[0].long() for e in entries]),
                            torch.stack([e.tail_logmass[0] for e in entries]), store.temperature)
    length = attention_mask.shape[1]
    logprobs = torch.zeros(len(entries), length, k)
    indices = torch.zeros(len(entries), length, k, dtype=torch.long)
    tail = torch.zeros(len(entries), length)
    for row, entry in enumerate(entries):
        n = entry.topk_logprobs.shape[0]
        if n != int(attention_mask[row].sum()):
            raise CheckpointError(f"the teacher store has {n} positions for a record the run tokenizes into "
                                  f"{int(attention_mask[row].sum())}; rebuild it with `kdistill cache-teacher`")
        logprobs[row, :n], indices[row, :n], tail[row, :n] = (
            entry.topk_logprobs.float(), entry.topk_indices.long(), entry.tail_logmass)
    return SparseLogits(logprobs, indices, tail, store.temperature)
