"""`stage:NAME` references in a recipe, resolved to that earlier stage's output in the run folder: its finished
student (a teacher, a generator, a Lion teacher) or a synthesize stage's kept rows (training data)."""
from __future__ import annotations

from pathlib import Path

from kdistill.config import STAGE_TEACHER, Recipe


def stage_student_dir(out: Path, recipe: Recipe, index: int) -> Path:
    """The last training stage writes the final student (a synthesize stage after it only makes data)."""
    training = [i for i, s in enumerate(recipe.stages) if s.synthesize is None]
    last = bool(training) and index == training[-1]
    return out / "student" if last else out / "stages" / recipe.stages[index].name / "student"


def synthesis_dir(out: Path, stage) -> Path:
    return out / "stages" / stage.name


def named_student(ref: str, out: Path, recipe: Recipe) -> str:
    """`stage:NAME` -> the folder of that earlier stage's finished student."""
    names = [s.name for s in recipe.stages]
    return str(stage_student_dir(out, recipe, names.index(ref[len(STAGE_TEACHER):])))


def with_stage_teacher(stage, out: Path, recipe: Recipe):
    """`teacher: {model: stage:NAME}` -> that earlier stage's finished student (multi-distillation)."""
    ref = str(stage.teacher.model)
    if not ref.startswith(STAGE_TEACHER):
        return stage
    teacher = stage.teacher.model_copy(update={"model": named_student(ref, out, recipe)})
    return stage.model_copy(update={"teacher": teacher})


def with_block_teacher(stage, block: str, out: Path, recipe: Recipe):
    """`synthesize.teacher.model: stage:NAME` or `lion.teacher.model: stage:NAME` (`block`) -> that earlier training
    stage's finished student."""
    part = getattr(stage, block)
    teacher = part.teacher
    if teacher is None or not str(teacher.model or "").startswith(STAGE_TEACHER):
        return stage
    teacher = teacher.model_copy(update={"model": named_student(teacher.model, out, recipe)})
    return stage.model_copy(update={block: part.model_copy(update={"teacher": teacher})})


def uses_stage_data(stage, splits=("train", "eval")) -> bool:
    """Whether the stage's data (of these splits) is an earlier synthesize stage's kept rows (`path: stage:NAME`)."""
    from kdistill.config import data_specs

    fields = tuple(f"data.{split}" for split in splits)
    return any(str(spec.path or "").startswith(STAGE_TEACHER) for where, spec in data_specs(stage)
               if where.startswith(fields))


def with_stage_data(stage, out: Path, recipe: Recipe, prefix: str = ""):
    """`data: {train: {path: stage:NAME}}` -> the kept rows of that earlier synthesize stage."""
    if not uses_stage_data(stage):
        return stage
    import json

    from kdistill.api.synthesize import SUMMARY, is_synthesized, kept_path
    from kdistill.errors import DataError

    def resolve(spec, where):
        if not str(spec.path or "").startswith(STAGE_TEACHER):
            return spec
        folder = out / "stages" / spec.path[len(STAGE_TEACHER):]  # the synthesize stage's synthesis_dir
        if not is_synthesized(folder):
            raise DataError(f"{prefix}{where}: {spec.path} has not finished synthesizing ({folder}); run the recipe "
                            f"with --resume to finish it")
        summary = json.loads((folder / SUMMARY).read_text())
        if not summary["kept"]:
            raise DataError(f"{prefix}{where}: {spec.path} kept none of its {summary['candidates']} candidates "
                            f"(dropped: {summary['dropped_by_verdict']}); the reasons are in {folder / 'data.jsonl'}. "
                            f"Loosen the filter, ask for more candidates or a higher temperature, or use a better teacher")
        return spec.model_copy(update={"path": str(kept_path(folder))})

    data = stage.data
    update = {}
    for split in ("train", "eval"):
        specs = getattr(data, split)
        if isinstance(specs, list):
            update[split] = [resolve(spec, f"data.{split}[{j}].path") for j, spec in enumerate(specs)]
        elif specs is not None:
            update[split] = resolve(specs, f"data.{split}.path")
    return stage.model_copy(update={"data": data.model_copy(update=update)})

