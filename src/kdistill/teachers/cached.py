"""A teacher that runs once: `kdistill cache-teacher RECIPE` writes its top-k outputs to a store, and
`teacher: {source: cache, path: DIR}` trains from that store without the teacher's weights.

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
import shutil
import time
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


def data_fingerprint(records: list[dict], cut: str) -> str:
    """Which records (as keys, in a set) and how they were cut: a store built for other data is refused."""
    from kdistill.teachers.fingerprint import fingerprint_text

    return fingerprint_text(cut, *sorted({record_key(r) for r in records}))


def data_fingerprints(records: list[dict], cut: str) -> dict[str, str]:
    """The data's fingerprint, and its two halves apart, so that a refusal can say which one differs: the records
    (hashed) and the cut (as it is: a max_length, or the image settings)."""
    from kdistill.teachers.fingerprint import fingerprint_text

    return {"data": data_fingerprint(records, cut), "records": fingerprint_text("records", *sorted(
        {record_key(r) for r in records})), "cut": cut}


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


def cache_teacher(recipe, stage_index: int = 0, k: int = 64, out: str | None = None, batch_size: int = 32,
                  temperature: float | None = None, dtype: str = "float16", console=None,
                  next_token: bool = True, sample: int | None = None, sample_head: int = 0) -> Path:
    """Run the stage's teacher over its training records once and write the store (for a causal LM with
    each position's next token beside the top k, unless `next_token` is False; with `sample`, that many
    tokens drawn from the teacher per position instead of the top k, after its `sample_head` most likely)."""
    if not 0 <= stage_index < len(recipe.stages):
        raise ConfigError(f"--stage {stage_index}: the recipe has stages 0..{len(recipe.stages) - 1}")
    stage = recipe.stages[stage_index]
    if stage.teacher.source != "live":  # the model a store is made of is run here: its settings make this store
        if stage.teacher.model is None:
            raise ConfigError("cache-teacher runs the teacher model, and this stage's teacher is a store (teacher.path) "
                              "with no teacher.model: name the model beside it, or train from the store as it is")
        live = stage.teacher.model_copy(update={"source": "live", "path": None, "sample": None, "sample_head": 0})
        stage = stage.model_copy(update={"teacher": live})
    from kdistill.engine.stage_refs import with_stage_teacher

    resolved = with_stage_teacher(stage, Path(recipe.output), recipe)  # stage:NAME: that student, in the run folder
    if resolved is not stage:
        from kdistill.engine.export import is_complete

        stage = resolved
        if not is_complete(Path(stage.teacher.model)):
            raise ConfigError(f"--stage {stage_index}: its teacher is {recipe.stages[stage_index].teacher.model}, a "
                              f"student not trained yet ({stage.teacher.model}): run `kdistill run` on the recipe "
                              f"first (the store is of that student)")
    return cache_stage(stage, Path(out or Path(recipe.output) / "teacher-store"), k, batch_size, temperature,
                       dtype, console, next_token, sample, sample_head, k_asked=True)


def cache_stage(stage, out: Path, k: int = 64, batch_size: int = 32, temperature: float | None = None,
                dtype: str = "float16", console=None, next_token: bool = True, sample: int | None = None,
                sample_head: int = 0, k_asked: bool = False, progress: bool = True) -> Path:
    """`k_asked`: k came from the user (`--k`), so one above the vocabulary is refused; a recipe's default top_k is
    cut to the vocabulary (a small model's store is then exact)."""
    from rich.progress import Progress

    from kdistill.engine.build import make_collator, read_sources
    from kdistill.models.blueprints import is_blueprint
    from kdistill.models.loading import has_classifier_head, load_model
    from kdistill.teachers.fingerprint import fingerprint_tensors
    from kdistill.teachers.recipe_runs import resolve_teacher
    from kdistill.teachers.store import StoreWriter
    from kdistill.teachers.store_writer import is_store

    if sample_head and not sample:
        raise ConfigError(f"sample_head={sample_head} keeps the teacher's top tokens beside the draws of `sample`; "
                          f"give sample=N too, or leave sample_head at 0 for a top-k store")
    if temperature is not None and not temperature > 0:
        raise ConfigError(f"--temperature {temperature}: a temperature divides the logits, so it must be above 0")
    if is_blueprint(stage.teacher.model):  # `teacher:` of a teacher recipe: what it trains from
        raise PairingError(f"teacher.model {stage.teacher.model} is a random init (a blueprint): a store of it would "
                           f"hold untrained outputs; cache a recipe that distils from a trained teacher (e.g. lm-kd, "
                           f"whose teacher is recipe:lm-teacher)")
    temperature = kd_temperature(stage) if temperature is None else temperature
    records = read_sources(stage.data.train, "train", "data.train", stage.train.seed)
    loaded = load_model(resolve_teacher(stage.teacher.model, console), stage.teacher.task,
                        stage.teacher.trust_remote_code)
    if loaded.task not in ("classification", "image-classification", "causal-lm", "masked-lm"):
        raise PairingError(f"teacher.model {stage.teacher.model} is an {loaded.task} model; a teacher store keeps "
                           f"output distributions (logits), which it has none of: keep teacher.source: live")
    if loaded.task in ("classification", "image-classification") and not has_classifier_head(loaded.model.config):
        saved = ", ".join(loaded.model.config.architectures or []) or "no architecture"
        raise PairingError(f"teacher.model {stage.teacher.model} has no trained classification head (saved as "
                           f"{saved}): a store of it would hold a random head's outputs; fine-tune it on the task "
                           f"first (a fine_tune stage, e.g. recipe:teacher-supersense)")
    teacher = loaded.model.eval()
    collator = make_collator(stage, loaded, teacher.config, None, "")
    fingerprints = {"teacher": fingerprint_tensors(teacher.state_dict()),
                    "tokenizer": tokenizer_fingerprint(loaded.tokenizer),
                    **data_fingerprints(records, data_cut(stage, collator))}
    items = teacher_views(stage, records)
    vocab = teacher.config.get_text_config().vocab_size if loaded.task == "causal-lm" else teacher.config.num_labels
    next_token = next_token and loaded.task == "causal-lm" and not sample
    if sample and sample_head >= vocab:
        raise ConfigError(f"sample_head={sample_head}: the teacher has {vocab:,} tokens; keep the head below that, so "
                          f"some remain to draw from")
    if k_asked and loaded.task == "causal-lm" and not sample and k > vocab - next_token:
        raise ConfigError(f"--k {k}: the teacher has {vocab:,} tokens"
                          + (", and the next token has a column of its own" if next_token else "")
                          + f", so at most {vocab - next_token:,} fit, and a store of all of them is as large as the "
                            f"full outputs; ask for far fewer (docs/teacher-store.md measures k)")
    head = sample_head if sample else 0
    asked = sample or k
    k = min(sample, vocab - head) if sample else min(k, vocab - next_token)
    if k < asked and console is not None:
        console.print(f"[yellow]{asked} columns asked, {k} kept[/yellow]: the teacher has {vocab:,} tokens"
                      + (f", {head} of them in the exact head" if head else "")
                      + (" and the next token has a column of its own" if next_token else ""))
    if console is not None and is_store(Path(out)):
        console.print(f"replacing the earlier store at {out} once this one is complete")
    with StoreWriter(out, k=k, temperature=temperature, fingerprints=fingerprints, dtype=dtype, vocab_size=vocab,
                     overwrite=True, next_token=next_token, sampled=bool(sample), head=head) as writer, torch.inference_mode(), \
            Progress(disable=console is None or not progress, console=console) as bar:
        task = bar.add_task("teacher over the training data", total=len(items))
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch = collator([r for _, r in chunk])
            logits = teacher(**{k_: v for k_, v in batch.items() if k_ != "labels"}).logits.float()
            for row, (key, record) in enumerate(chunk):
                extra = {"view_seed": torch.tensor([record["view_seed"]])} if "view_seed" in record else None
                if logits.dim() == 2:  # one distribution per sequence (or image view)
                    writer.add(key, logits[row], extra=extra)
                else:  # right-padded: the first n positions are the record's
                    n = int(batch["attention_mask"][row].sum())
                    following = (torch.cat([batch["input_ids"][row, 1:n], torch.tensor([-1])])[:n] if next_token
                                 else None)  # [:n]: an empty record has no positions, not one
                    writer.add(key, logits[row, :n], extra=extra, next_tokens=following)
            bar.advance(task, len(chunk))
    teacher.config.save_pretrained(out / TEACHER_FILES)
    if getattr(teacher.config, "auto_map", None) and os.path.isdir(loaded.path):
        # a teacher with its own architecture code: training from the store rebuilds its shape from that code
        for code in Path(loaded.path).glob("*.py"):
            shutil.copy2(code, out / TEACHER_FILES / code.name)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out / TEACHER_FILES)
    return out


def teacher_views(stage, records: list[dict]) -> list[tuple[str, dict]]:
    """(key, record) for every input the teacher must see once: each unique record, or with random
    views each image's view of every epoch the stage trains for, seeded exactly as training seeds it."""
    unique = list({record_key(r): r for r in records}.values())
    epochs = view_epochs(stage, len(records))
    if not epochs:
        return [(record_key(r), r) for r in unique]
    from kdistill.data.images import view_seed

    seed = stage.data.image_augment.seed
    views = [dict(r, epoch=e, view_seed=view_seed(seed, r["id"], e)) for e in range(epochs) for r in unique]
    return [(record_key(v), v) for v in views]


def with_live_teacher(stage):
    """The stage with its teacher run live: what an automatic store is built from (and paired against)."""
    return stage.model_copy(update={"teacher": stage.teacher.model_copy(update={"source": "live"})})


def automatic_store(stage, console=None, progress: bool = True) -> Path:
    """`teacher: {source: cache, model: M}` without a path: M's store for this data, built on first use
    under $KDISTILL_HOME/stores and reused by every later run, seed and student that asks the same. One process
    builds it under a file lock while any other that asks for it (the other ranks of a distributed launch, another
    command) waits: each built it and replaced the other's, while the other might already read it. A file lock,
    not a barrier, which a build longer than the process group's timeout would break."""
    from filelock import FileLock
    from kdistill.teachers.recipe_runs import kdistill_home, resolve_teacher
    from kdistill.teachers.store_writer import VERSION as STORE_VERSION

    teacher_dir = Path(resolve_teacher(stage.teacher.model, console))
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in teacher_dir.glob("*.safetensors"))
    train = stage.data.train if isinstance(stage.data.train, list) else [stage.data.train]
    spec = {"teacher": str(teacher_dir), "weights": weights, "train": [t.model_dump(mode="json") for t in train],
            "cut": data_cut(stage, None),
            "views": stage.data.image_augment.model_dump(mode="json") if stage.data.image_augment else None,
            "image_size": stage.data.image_size, "steps": stage.train.steps * stage.train.batch_size,
            "k": stage.teacher.top_k, "temperature": kd_temperature(stage), "task": stage.teacher.task,
            "format": STORE_VERSION}
    if stage.teacher.sample is not None:  # only then: the top-k stores built before the field keep their names
        spec["sample"] = stage.teacher.sample
    if stage.teacher.sample_head:
        spec["sample_head"] = stage.teacher.sample_head
    spec = json.dumps(spec, sort_keys=True)
    name = str(stage.teacher.model).replace(":", "-").replace("/", "-")[-40:]
    out = kdistill_home() / "stores" / f"{name}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"
    if (out / "manifest.json").exists():
        return out
    locks = kdistill_home() / "locks"  # not among the stores, where it would look like one
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"store-{out.name}.lock")):
        if (out / "manifest.json").exists():  # built by the process this one waited for
            return out
        if console is not None:
            console.print(f"building the teacher store {out} (once; later runs reuse it)")
        start = time.perf_counter()
        cache_stage(with_live_teacher(stage), out, k=stage.teacher.top_k, console=console, sample=stage.teacher.sample,
                    sample_head=stage.teacher.sample_head, progress=progress)
        if console is not None:
            console.print(f"teacher store built in {time.perf_counter() - start:.0f} s")
    return out


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
