"""What plain `kdistill validate` checks without loading a model or reading data: that the names and files a recipe
refers to exist (a misspelt recipe:, packaged: or blueprint: name, a missing data file or model folder, an unknown
split), and that a stage on a teacher store asks it for nothing a store does not hold. `validate --full` and `run`
load them and find the rest (layers, widths, taps)."""
from __future__ import annotations

from pathlib import Path

from kdistill.config import DataSource, Recipe
from kdistill.errors import ConfigError, DataError


def check_references(recipe: Recipe, skip: set[int] = frozenset()) -> None:
    """What each stage refers to exists (`skip`: stages a resume will not run again)."""
    for i, stage in enumerate(recipe.stages):
        if i in skip:
            continue
        prefix = f"stages[{i}]." if len(recipe.stages) > 1 else ""
        for where, ref in model_refs(stage, prefix):
            check_model(ref, where)
        if stage.teacher is not None and stage.teacher.source == "cache":  # what a store cannot give: from the recipe
            from kdistill.engine.build import check_store_stage

            check_store_stage(stage, prefix)
        if stage.data is not None:
            for block, split in (("train", "train"), ("eval", "eval")):
                specs = getattr(stage.data, block)
                for source in specs if isinstance(specs, list) else [specs] if specs is not None else []:
                    check_source(source, split, f"{prefix}data.{block}")


def model_refs(stage, prefix: str) -> list[tuple[str, str | None]]:
    """(field, reference) of each model a stage names: its teacher, and the model its student comes from."""
    refs = [(f"{prefix}teacher.model", stage.teacher.model if stage.teacher else None)]
    if stage.student is not None:
        kind, spec = stage.student.kind()
        refs += [(f"{prefix}student.model", spec)] if kind == "model" else [
            (f"{prefix}student.{kind}.{field}", getattr(spec, field, None)) for field in ("model", "layers_from")]
    return refs


def check_model(ref: str | None, where: str) -> None:
    from kdistill.models.loading import check_model_dir, check_model_name, looks_local

    if not ref or str(ref).startswith("stage:"):  # an earlier stage's student: exists once that stage has run
        return
    check_model_name(str(ref), where)
    path = Path(ref).expanduser()
    if looks_local(str(ref)) and not path.is_dir():  # the loader's rule: not tried on the hub
        raise DataError(f"{where}: model directory {ref!r} does not exist")
    if path.is_dir():
        check_model_dir(path, str(ref), where)


def hub_notes(recipe: Recipe) -> list[str]:
    """A model reference that is no folder here and not in the Hugging Face cache is taken as a hub id and downloaded
    when the run starts: said before then, with a folder of a close name if there is one (a misspelt relative path
    looks like a hub id)."""
    from huggingface_hub import try_to_load_from_cache

    from kdistill.errors import did_you_mean
    from kdistill.models.loading import hub_offline, looks_local

    notes = []
    for i, stage in enumerate(recipe.stages):
        for where, ref in model_refs(stage, f"stages[{i}]." if len(recipe.stages) > 1 else ""):
            if not isinstance(ref, str) or ":" in ref or looks_local(ref) or Path(ref).expanduser().exists():
                continue
            try:
                if isinstance(try_to_load_from_cache(ref, "config.json"), str):
                    continue
            except ValueError:  # no valid repo id: the loader says so
                continue
            parent = Path(ref).parent
            here = [str(parent / p.name) for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []
            fetched = ("the run will fail: HF_HUB_OFFLINE is set" if hub_offline()
                       else "downloaded when the run starts")
            notes.append(f"note: {where} {ref!r} is no folder here ({Path.cwd()}) and not in the Hugging Face cache: "
                         f"it is taken as a hub id, {fetched}{did_you_mean(ref, here)}")
    return notes


def check_source(source: DataSource, split: str, where: str) -> None:
    from kdistill.data.corpora import check_split
    from kdistill.data.sources import require_path

    if source.source is not None:
        check_split(source.split or split, f"{where}.split")
    if source.path is not None and not str(source.path).startswith("stage:"):
        require_path(str(source.path), where)
        from kdistill.data.sources import has_splits

        # `split: train` on the training file changes nothing; an eval split of one file would be its training records
        if source.split not in (None, "train" if split == "train" else None) and not has_splits(source):
            raise ConfigError(f"{where}.split: {source.path} is one split (a file, or a folder without split "
                              f"folders), so it has no {source.split!r} split to choose; give each split its own "
                              f"file (data.train: train.jsonl, data.eval: dev.jsonl) and leave split out")
