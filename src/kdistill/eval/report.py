"""Compare a student with its teacher: footprint, speed, and quality on one or more datasets.

`evaluate` returns one JSON-able dict (the contract the CLI, `kdistill.json` and benchmarks share);
`render_table` shows it, `save` writes it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from kdistill.errors import ConfigError, DataError, PairingError, article

# Tasks whose pooled last hidden state is the model's output, so fidelity to the teacher is its
# quality measure. Classifiers and causal LMs are judged by their own head instead.
ENCODER_TASKS = ("embedding", "masked-lm")
TEXT_TASKS = ENCODER_TASKS + ("classification", "causal-lm")
IMAGE_TASKS = ("image-classification",)
SPEED_TEXTS = 128  # a few batches time steadily; more only makes a CPU eval slow (4 passes each)
SPEED_REPEATS = 3
FILE_SUFFIXES = (".jsonl", ".csv", ".txt")


@dataclass
class Side:
    ref: str
    model: Any
    tokenizer: Any
    path: str
    task: str
    pooling: str


def spec_from_arg(arg: str, fields: dict | None = None) -> dict:
    """A data source block from one command-line word: a built-in corpus name, a file or saved
    dataset folder, or `dataset:NAME` for the Hugging Face hub; `fields` (text, label, image: the names of
    those fields) apply to files and datasets, which name their own."""
    from kdistill.data import CORPORA

    fields = {k: v for k, v in (fields or {}).items() if v is not None}
    if arg.startswith("dataset:"):
        return {"dataset": arg.split(":", 1)[1], **fields}
    if arg in CORPORA:
        return {"source": arg}
    arg = os.path.expanduser(arg)
    if os.path.exists(arg) or arg.lower().endswith(FILE_SUFFIXES):
        return {"path": arg, **fields}
    raise ConfigError(CORPORA.unknown_message(arg, "--data")
                      + "; or give a .jsonl/.csv/.txt file, or dataset:NAME for a hub dataset")


READ_PER_TAKEN = 100


def load_datasets(data_spec: dict | list[dict], split: str, limit: int | None) -> dict[str, list[dict]]:
    """{name: records} for one source block or a list of them, each named by its source value. `limit` records
    are taken evenly through each source (built-in corpora are ordered by topic or class: the first 512 glosses of
    the supersense split hold 3 of its 45 classes), from at most the first READ_PER_TAKEN × limit of them, so a
    huge file or dataset is not read whole for a sample; a source's own `limit:` keeps its meaning, the first N."""
    from kdistill.data import load_records
    from kdistill.data.images import is_image_record
    from kdistill.eval.arguments import check_data_source
    from kdistill.data.sources import spread

    if not isinstance(data_spec, (dict, list, tuple)):
        raise ConfigError(f"data is one source ({{'source': NAME}}, {{'path': FILE}} or {{'dataset': NAME}}) or a list "
                          f"of them; got {type(data_spec).__name__} {data_spec!r}")
    specs = [data_spec] if isinstance(data_spec, dict) else list(data_spec)
    if not specs:
        raise ConfigError("evaluate needs at least one data source")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a whole number of records >= 1, or None for all; got {limit!r}")
    out: dict[str, list[dict]] = {}
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ConfigError(f"data source {i} must be a mapping such as {{source: NAME}}, "
                              f"got {type(spec).__name__}")
        check_data_source(spec, i)
        spec = dict(spec)
        own_limit = spec.get("limit") is not None
        if limit is not None and not own_limit:
            spec["limit"] = limit * READ_PER_TAKEN
        name = str(spec.get("name") or next((spec[k] for k in ("source", "path", "dataset") if spec.get(k)), i))
        if name in out:  # e.g. the same corpus twice with different splits
            name = f"{name} ({spec.get('split') or split})"
        if name in out:
            name = f"{name} #{i}"
        records = load_records({k: v for k, v in spec.items() if k != "name"}, split)
        records = [r for r in records if str(r.get("text", "")).strip() or is_image_record(r)]
        out[name] = records if own_limit else spread(records, limit)
    return out


def _load(ref: str, device: str | None, trust_remote_code: bool = False) -> Side:
    from kdistill.models.arch import model_info
    from kdistill.models.loading import load_model, read_pooling

    loaded = load_model(ref, trust_remote_code=trust_remote_code)
    if loaded.task not in TEXT_TASKS + IMAGE_TASKS:
        raise ConfigError(f"{ref} is {article(loaded.task)} model; evaluate handles "
                          f"{', '.join(TEXT_TASKS + IMAGE_TASKS)} models")
    model = loaded.model.to(device) if device else loaded.model
    pooling = read_pooling(loaded.path)
    if pooling is None:
        try:
            pooling = model_info(model, loaded.task).pooling
        except PairingError:  # an unusual layout: fall back to the same defaults model_info uses
            pooling = "last" if loaded.task == "causal-lm" else "mean"
    return Side(ref, model, loaded.tokenizer, loaded.path, loaded.task, pooling)


def _weights_dir(path: str) -> str | None:
    if os.path.isdir(path):
        return path
    try:  # a hub id: its files are already in the local cache, since the model just loaded
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - size is informative only; unknown is an honest answer
        return None


def _class_names(model, records: list[dict]) -> list[str]:
    from kdistill.data import label_names

    id2label = getattr(model.config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label)]
    # Transformers fills LABEL_0.. when the trainer saved no names; only then fall back to the
    # sorted labels of the data, which is how kdistill builds class indexes for training.
    if names and not all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return names
    return label_names(records)


def evaluate(student_ref: str, teacher_ref: str | None, data_spec: dict | list[dict], *,
             split: str = "eval", limit: int | None = 512, batch_size: int = 64,
             max_length: int = 128, speed: bool = True, device: str | None = None,
             trust_remote_code: bool = False) -> dict:
    """Footprint, speed and quality of a student (and its teacher, when given) on each dataset;
    `trust_remote_code` runs the models' own architecture code, off unless you trust its source."""
    import torch

    from kdistill.eval.embeddings import compare_speed, encode, fidelity
    from kdistill.eval.metrics import accuracy, count_parameters, perplexity, size_on_disk

    from kdistill.eval.arguments import check_settings

    check_settings(student_ref, teacher_ref, batch_size, max_length, device)
    datasets = load_datasets(data_spec, split, limit)
    student_ref, teacher_ref = os.fspath(student_ref), teacher_ref and os.fspath(teacher_ref)  # JSON-ready refs
    refs = {"teacher": teacher_ref, "student": student_ref} if teacher_ref else {"student": student_ref}
    sides = {role: _load(ref, device, trust_remote_code) for role, ref in refs.items()}
    result: dict = {
        "settings": {"split": split, "limit": limit, "batch_size": batch_size, "max_length": max_length,
                     "device": str(next(sides["student"].model.parameters()).device),
                     "threads": torch.get_num_threads()},
        "models": {}, "speedup": None, "datasets": {},
    }
    for role, side in sides.items():
        size = size_on_disk(_weights_dir(side.path))
        result["models"][role] = {
            "ref": side.ref, "task": side.task, "pooling": side.pooling,
            "params": count_parameters(side.model),
            "size_mb": None if size is None else size / 1e6, "texts_per_s": None,
        }
    check_modality(datasets, sides["student"])
    student_task, teacher_task = sides["student"].task, sides["teacher"].task if "teacher" in sides else None
    if student_task in ENCODER_TASKS and teacher_task not in (None, *ENCODER_TASKS, *IMAGE_TASKS):
        # an encoder student is scored by its fidelity to an encoder teacher, and has no metric of its own
        raise PairingError(f"the student is {article(student_task)} model and the teacher {article(teacher_task)} "
                           f"model: no score compares them (an embedding student is scored against an embedding "
                           f"teacher); evaluate against the encoder it was distilled from, or without a teacher")
    if sides["student"].task in IMAGE_TASKS:
        return evaluate_images(result, sides, datasets, speed)
    pair = "teacher" in sides and all(s.task in ENCODER_TASKS for s in sides.values())
    for name, records in datasets.items():
        texts = [r["text"] for r in records]
        entry: dict = {"n": len(texts)}
        if pair:
            emb = {role: encode(s.model, s.tokenizer, texts, s.pooling, batch_size, max_length)
                   for role, s in sides.items()}
            entry.update(fidelity(emb["student"], emb["teacher"], k=10))
            entry["n"] = len(texts)
        for role, s in sides.items():
            if s.task == "classification" and any(r.get("label") is not None for r in records):
                names = _class_names(s.model, records)
                with naming(name, role):
                    entry.setdefault("accuracy", {})[role] = accuracy(
                        s.model, s.tokenizer, records, names, batch_size, max_length)
            elif s.task == "causal-lm":
                entry.setdefault("perplexity", {})[role] = perplexity(
                    s.model, s.tokenizer, texts, batch_size, max_length)
        result["datasets"][name] = entry
    if speed:
        # Both models are timed here, in one run, on the same texts and interleaved (see
        # compare_speed): throughput measured at different times or on different texts on a shared
        # machine differs by more than a small student's real gain.
        texts = [r["text"] for r in next(iter(datasets.values()))][:SPEED_TEXTS]
        tps = compare_speed({role: (s.model, s.tokenizer, s.pooling) for role, s in sides.items()},
                            texts, batch_size, max_length, SPEED_REPEATS)
        for role, value in tps.items():
            result["models"][role]["texts_per_s"] = value
        result["settings"]["speed_texts"] = len(texts)
        if "teacher" in tps:
            result["speedup"] = tps["student"] / tps["teacher"]
    return result


def check_modality(datasets: dict[str, list[dict]], student: Side) -> None:
    """Images for an image model and texts for a text model, named (either way the model fails deep inside)."""
    from kdistill.data.images import is_image_record

    images = student.task in IMAGE_TASKS
    for name, records in datasets.items():
        if all(is_image_record(r) == images for r in records):
            continue
        if images:
            raise DataError(f"data {name!r} holds texts, and {student.ref} is an image classifier: evaluate it on "
                            f"images (a folder of class folders, the digits corpus, or a table with an image field)")
        from kdistill.models.student import reads_only_images

        if reads_only_images(student.model.config):  # e.g. an untrained ViT blueprint: no head, so no task
            raise DataError(f"{student.ref} is an image model ({student.model.config.model_type}) without a "
                            f"classification head, so there is nothing to score on {name!r}: evaluate an image "
                            f"classifier (a trained student, or recipe:vit-teacher)")
        raise DataError(f"data {name!r} holds images, and {student.ref} is {article(student.task)} model: "
                        f"evaluate it on texts")


@contextlib.contextmanager
def naming(data: str, role: str):
    """A data error met while scoring one dataset says which dataset, and which model was being scored."""
    try:
        yield
    except DataError as err:
        raise DataError(f"data {data!r}, scoring the {role}: {err}") from None


def evaluate_images(result: dict, sides: dict, datasets: dict, speed: bool) -> dict:
    """Image classifiers: accuracy per dataset, images/s, and per-layer linear CKA student × teacher."""
    from kdistill.eval.images import image_accuracy, image_speed, layer_cka

    for role, side in sides.items():
        if side.task not in IMAGE_TASKS:
            raise PairingError(f"the student is an image classifier but the {role} is {article(side.task)} model")
    for name, records in datasets.items():
        entry: dict = {"n": len(records)}
        for role, s in sides.items():
            if any(r.get("label") is not None for r in records):
                with naming(name, role):
                    entry.setdefault("accuracy", {})[role] = image_accuracy(s.model, records,
                                                                            _class_names(s.model, records))
        if "teacher" in sides:
            try:
                grid = layer_cka(sides["student"].model, sides["teacher"].model, records)
            except PairingError:  # a convnet teacher has no transformer layers to compare
                grid = None
            if grid:
                entry["cka"] = grid
        result["datasets"][name] = entry
    if speed:
        records = next(iter(datasets.values()))[:512]
        ips = image_speed({role: s.model for role, s in sides.items()}, records)
        for role, value in ips.items():
            result["models"][role]["images_per_s"] = value
        if "teacher" in ips:
            result["speedup"] = ips["student"] / ips["teacher"]
    return result


# ---------------------------------------------------------------- output


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def render_table(result: dict):
    """A rich Table: one row per metric, teacher and student side by side."""
    from rich.table import Table

    models = result["models"]
    roles = [r for r in ("teacher", "student") if r in models]
    table = Table(title="kdistill eval", show_lines=False)
    table.add_column("metric", style="bold")
    for role in roles:
        table.add_column(f"{role}\n{models[role]['ref']}", justify="right", overflow="fold")

    def row(label, values):
        table.add_row(label, *values)

    row("task", [models[r]["task"] for r in roles])
    row("parameters", [_fmt(models[r]["params"]) for r in roles])
    row("size on disk (MB)", [_fmt(models[r]["size_mb"], 1) for r in roles])
    if any("images_per_s" in models[r] for r in roles):
        row("images / s", [_fmt(models[r].get("images_per_s"), 1) for r in roles])
    else:
        row("texts / s", [_fmt(models[r]["texts_per_s"], 1) for r in roles])
    if result.get("speedup") is not None:
        row("speedup vs teacher", ["1.00×", f"{result['speedup']:.2f}×"])
    # Fidelity compares the pair, so it sits in the student's column; the teacher is the reference.
    pair_metrics = [("cosine", "cosine to teacher"), ("spearman", "similarity spearman"),
                    ("recall_at_10", "neighbour recall@10")]
    for name, entry in result["datasets"].items():
        table.add_section()
        row(f"[italic]{name}[/] (n={entry['n']})", [""] * len(roles))
        for key, label in pair_metrics:
            if key in entry:
                value = "n/a (widths differ)" if entry.get(f"{key}_error") else _fmt(entry[key])
                row(f"  {label}", ["ref"] * (len(roles) - 1) + [value])
        for key, label, digits in (("accuracy", "accuracy", 3), ("perplexity", "perplexity", 2)):
            if key in entry:
                row(f"  {label}", [_fmt(entry[key].get(r), digits) for r in roles])
        for i, cka_row in enumerate(entry.get("cka") or [], 1):  # each student layer's closest teacher layer
            best = max(range(len(cka_row)), key=cka_row.__getitem__)
            row(f"  CKA, student layer {i}", ["ref"] * (len(roles) - 1)
                + [f"{cka_row[best]:.3f} (teacher layer {best + 1})"])
    return table


def _finite(value):
    # Strict JSON has no NaN or Infinity (an overflowing perplexity); other tools choke on them.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def save(result: dict, path: str | os.PathLike) -> str:
    """Write the result as indented JSON (creating folders); returns the path."""
    from kdistill.errors import OutputError

    path = os.fspath(path)
    try:
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(_finite(result), f, indent=2, allow_nan=False)
            f.write("\n")
    except OSError as err:  # checked before the work, but a disk can fill or a folder change meanwhile
        raise OutputError(f"the report could not be written to {path} ({err.strerror or err}); the table above "
                          f"holds its results") from None
    return path


def check_report_path(path: str | os.PathLike, option: str, file_name: str) -> None:
    """Refuse a report path that cannot be written, before the work whose results it would lose."""
    from pathlib import Path

    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give the report's file name, e.g. {path / file_name}")
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"{option} {path} is a link to {os.readlink(path)}, which does not exist; choose another path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{option} {path}: {parent} is a file, so no folder can be made there; "
                                  f"choose another path")
            if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
                raise ConfigError(f"{option} {path}: {path if path.exists() else parent} cannot be written (read-only); "
                                  f"choose another path")
            break


def check_replaceable_report(path: str | os.PathLike, option: str) -> None:
    """An existing file at an eval report's path is replaced only if it is an earlier eval report: a mistyped
    --output must not turn a model's weights or the data into JSON."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        return
    try:
        earlier = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        earlier = None
    if not (isinstance(earlier, dict) and {"settings", "models", "datasets"} <= set(earlier)):
        raise ConfigError(f"{option} {path} exists and is not an earlier `kdistill eval` report; it is left as "
                          f"it is: choose another path (a report there would replace it)")
