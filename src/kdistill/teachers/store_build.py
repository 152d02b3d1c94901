"""Building a teacher store: the stage's teacher run once over its training records (each random view of an image
included), written with StoreWriter, from `kdistill cache-teacher` or, for `teacher: {source: cache, model: M}`
without a path, once under $KDISTILL_HOME/stores for every run that asks the same."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from kdistill.errors import ConfigError, DataError, PairingError
from kdistill.teachers.cached import (TEACHER_FILES, data_cut, data_fingerprints, kd_temperature, record_key,
                                      tokenizer_fingerprint, view_epochs)


def cache_teacher(recipe, stage_index: int = 0, k: int = 64, out: str | None = None, batch_size: int = 32,
                  temperature: float | None = None, dtype: str = "float16", console=None,
                  next_token: bool = True, sample: int | None = None, sample_head: int = 0) -> Path:
    """Run the stage's teacher over its training records once and write the store (for a causal LM with
    each position's next token beside the top k, unless `next_token` is False; with `sample`, that many
    tokens drawn from the teacher per position instead of the top k, after its `sample_head` most likely)."""
    if not 0 <= stage_index < len(recipe.stages):
        raise ConfigError(f"--stage {stage_index}: the recipe has stages 0..{len(recipe.stages) - 1}")
    stage = recipe.stages[stage_index]
    if stage.synthesize is not None or stage.teacher is None:
        trained = [i for i, s in enumerate(recipe.stages) if s.synthesize is None]
        raise ConfigError(f"--stage {stage_index}: that stage makes training data and has no teacher to store; "
                          f"the stages with one: {', '.join(map(str, trained)) or 'none'} (--stage N)")
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
    from kdistill.engine.stage_refs import uses_stage_data, with_stage_data

    if uses_stage_data(stage, ("train",)):  # stage:NAME data: an earlier stage's kept rows, in the run folder
        try:
            stage = with_stage_data(stage, Path(recipe.output), recipe)
        except DataError as err:
            raise DataError(f"--stage {stage_index}: its training data is made by an earlier stage of the recipe "
                            f"(`kdistill run` makes it): {err}") from None
    from kdistill.teachers.store_writer import check_store_output

    out = Path(out or Path(recipe.output) / "teacher-store")
    check_store_output(out)  # before the teacher's pass over the data, not at its end
    return cache_stage(stage, out, k, batch_size, temperature, dtype, console, next_token, sample, sample_head,
                       k_asked=True)


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


def file_stamps(source) -> list[tuple[str, int, int]]:
    """(path, size, modification time) of each file a path source reads: a file, or every file under a folder."""
    path = getattr(source, "path", None)
    if not path or str(path).startswith("stage:"):
        return []
    root = Path(path)
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else []
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


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
    files = [stamp for t in train for stamp in file_stamps(t)]
    if files:  # a data file edited in place is other data: a store of its old records would be refused, not reused
        spec["files"] = files
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
