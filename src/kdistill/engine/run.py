"""A run: the resolved recipe, its stages in order, resume, and the final student directory.

Layout of `output/`:
  config.resolved.yaml      the exact recipe that ran (overrides applied)
  checkpoints/<stage>/step-N  resumable state
  logs/<stage>.jsonl, tensorboard/<stage>, loss_curves.png
  stages/<stage>/student    a finished intermediate stage (multi-stage recipes)
  student/                  the final student: a standard Hugging Face directory
"""
from __future__ import annotations

import time
from pathlib import Path

import yaml

from kdistill.config import Recipe, diff_configs
from kdistill.engine.export import is_complete, save_student
from kdistill.errors import CheckpointError, ConfigError


def make_accelerator(precision: str = "fp32", cpu: bool | None = None):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Terms may leave some student parameters unused (e.g. BERT's pooler): DDP must allow that.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    return Accelerator(cpu=cpu, mixed_precision={"fp32": "no"}.get(precision, precision), kwargs_handlers=[ddp])


def stage_student_dir(out: Path, recipe: Recipe, index: int) -> Path:
    last = index == len(recipe.stages) - 1
    return out / "student" if last else out / "stages" / recipe.stages[index].name / "student"


def prepare_run_dir(recipe: Recipe, resume: bool, force: bool) -> Path:
    """Refuse to overwrite a run unless resuming it, and refuse to resume it with a different recipe."""
    out = Path(recipe.output)
    resolved = out / "config.resolved.yaml"
    current = recipe.dump()
    if resolved.exists():
        if not resume:
            raise ConfigError(
                f"{out} already holds a run; pass --resume to continue it, or choose another --output"
            )
        try:
            previous = yaml.safe_load(resolved.read_text())
        except yaml.YAMLError:
            raise CheckpointError(f"{resolved} is corrupt; cannot tell which recipe wrote this run") from None
        changed = diff_configs(previous, current)
        if changed and not force:
            raise CheckpointError(
                f"cannot resume {out}: the recipe differs from the one that started it:\n  "
                + "\n  ".join(changed) + "\nundo those changes, or pass --force to resume anyway"
            )
    out.mkdir(parents=True, exist_ok=True)
    resolved.write_text(yaml.safe_dump(current, sort_keys=False))
    return out


def with_stage_teacher(stage, out: Path, recipe: Recipe):
    """`teacher: {model: stage:NAME}` -> that earlier stage's finished student (multi-distillation)."""
    from kdistill.config import STAGE_TEACHER

    ref = str(stage.teacher.model)
    if not ref.startswith(STAGE_TEACHER):
        return stage
    names = [s.name for s in recipe.stages]
    path = stage_student_dir(out, recipe, names.index(ref[len(STAGE_TEACHER):]))
    return stage.model_copy(update={"teacher": stage.teacher.model_copy(update={"model": str(path)})})


def run_recipe(recipe: Recipe, resume: bool = False, force: bool = False, console=None, progress: bool = True) -> Path:
    from kdistill.engine.build import build_stage
    from kdistill.engine.logs import plot_losses
    from kdistill.engine.loop import StageTrainer

    first = recipe.stages[0]
    accelerator = make_accelerator(first.train.precision)
    if accelerator.is_main_process:
        out = prepare_run_dir(recipe, resume, force)
    accelerator.wait_for_everyone()
    out = Path(recipe.output)
    previous: str | None = None
    history = []
    for index, stage in enumerate(recipe.stages):
        target = stage_student_dir(out, recipe, index)
        prefix = f"stages[{index}]." if len(recipe.stages) > 1 else ""
        if resume and is_complete(target):
            previous = str(target)  # a finished stage is not trained again
            continue
        stage = with_stage_teacher(stage, out, recipe)
        parts = build_stage(stage, None if (stage.student is not None and index > 0) else previous, prefix, console)
        trainer = StageTrainer(parts, stage, out, accelerator, console=console, progress=progress)
        resumed = resume and trainer.resume()
        if resumed and console is not None and accelerator.is_main_process:
            console.print(f"resuming stage {stage.name!r} at step {trainer.step}")
        result = trainer.fit()
        accelerator.wait_for_everyone()
        history.append({"stage": stage.name, "steps": result.steps, "wall_time_s": round(result.wall_time_s, 2),
                        "train": result.final_train, "eval": result.final_eval, "resumed": bool(resumed)})
        if accelerator.is_main_process:
            from kdistill.models.theseus import successor_only

            student = successor_only(accelerator.unwrap_model(trainer.model).student)
            metadata = {
                "kdistill_version": _version(), "recipe": recipe.name, "stage": stage.name,
                "teacher": stage.teacher.model or f"cache:{stage.teacher.path}", "student_init": stage.student.model_dump(exclude_none=True)
                if stage.student else {"previous_stage": previous},
                "steps": result.steps, "wall_time_s": round(result.wall_time_s, 2),
                "metrics": {"train": result.final_train, "eval": result.final_eval},
                "config": stage.model_dump(mode="json", exclude_none=True),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            save_student(student, parts.tokenizer, target, teacher_dir=parts.teacher_dir, metadata=metadata)
            plot_losses(out)
        accelerator.wait_for_everyone()
        previous = str(target)
    return out / "student"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdistill")
    except PackageNotFoundError:
        return "dev"

