"""A run: the resolved recipe, its stages in order, resume, and the final student directory.

Layout of `output/`:
  config.resolved.yaml      the exact recipe that ran (overrides applied)
  checkpoints/<stage>/step-N  resumable state
  logs/<stage>.jsonl, tensorboard/<stage>, loss_curves.png
  stages/<stage>/student    a finished intermediate stage (multi-stage recipes)
  stages/<stage>/data.jsonl a synthesize stage's candidates with provenance; kept.jsonl, summary.json
  stages/<stage>/round-RR/  a Lion stage's rounds: pool, answers, judgements, new instructions, student
  student/                  the final student: a standard Hugging Face directory
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from kdistill.config import Recipe
from kdistill.engine.export import is_complete, save_student
from kdistill.engine.run_dir import check_output, finished_stages, open_run_dir, run_lock, trained_anything
from kdistill.engine.stage_refs import (stage_student_dir, synthesis_dir, uses_stage_data, with_block_teacher,
                                       with_stage_data, with_stage_teacher)
from kdistill.errors import ConfigError


def make_accelerator(precision: str = "fp32", cpu: bool | None = None):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Terms may leave some student parameters unused (e.g. BERT's pooler): DDP must allow that.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    if cpu and precision == "fp16":  # Accelerate has no fp16 autocast on a CPU and quietly trains in fp32
        import warnings

        warnings.warn("train.precision: fp16 needs a GPU; on this CPU the run trains in fp32 (bf16 works on a CPU)",
                      stacklevel=2)
    return Accelerator(cpu=cpu, mixed_precision={"fp32": "no"}.get(precision, precision), kwargs_handlers=[ddp])


def run_synthesize_stage(stage, index: int, recipe: Recipe, out: Path, resume: bool, console, progress: bool) -> Path:
    from kdistill.api.synthesize import is_synthesized, run_synthesis

    target = synthesis_dir(out, stage)
    if resume and is_synthesized(target):
        return target  # finished: not generated or filtered again
    prefix = f"stages[{index}]." if len(recipe.stages) > 1 else ""
    stage = with_block_teacher(stage, "synthesize", out, recipe)
    run_synthesis(stage.synthesize, target, resume=resume, console=console, progress=progress,
                  where=f"{prefix}synthesize")
    return target


def run_lion_stage(stage, index: int, recipe: Recipe, out: Path, resume: bool, previous: str | None, accelerator,
                   console, progress: bool) -> Path:
    """Lion's rounds in out/stages/NAME; the last round's student becomes the stage's student."""
    import json
    import os
    import shutil

    from kdistill.api.lion import SUMMARY, run_lion

    prefix = f"stages[{index}]." if len(recipe.stages) > 1 else ""
    if accelerator.num_processes > 1:
        raise ConfigError(f"{prefix}lion: Lion's rounds run in one process (they generate and judge between "
                          "trainings); run this recipe without a multi-process launcher")
    declared = stage
    stage = with_block_teacher(with_stage_data(with_stage_teacher(stage, out, recipe), out, recipe, prefix), "lion",
                               out, recipe)
    last = run_lion(stage, synthesis_dir(out, stage), out, resume=resume, accelerator=accelerator, prefix=prefix,
                    previous_student=None if (stage.student is not None and index > 0) else previous,
                    console=console, progress=progress, declared=declared)
    target = stage_student_dir(out, recipe, index)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(last, tmp)
    metadata = json.loads((tmp / "kdistill.json").read_text())
    summary = json.loads((synthesis_dir(out, stage) / SUMMARY).read_text())
    (tmp / "kdistill.json").write_text(json.dumps({**metadata, "recipe": recipe.name, "stage": stage.name,
                                                   "lion": summary}, indent=2, default=str))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)  # the finished student appears whole
    return target


def run_recipe(recipe: Recipe, resume: bool = False, force: bool = False, console=None, progress: bool = True) -> Path:
    if force and not resume:  # alone it changes nothing: a new run needs no forcing, an existing one is refused
        raise ConfigError("--force continues an interrupted run under a changed recipe, so it goes with --resume "
                          "(--resume --force); a new run needs neither")
    check_output(Path(recipe.output))
    from kdistill.recipe_references import check_references

    # every stage's files and folders, before the first stage trains for hours; not those of stages a resume skips
    check_references(recipe, skip=finished_stages(recipe) if resume else set())
    with run_lock(Path(recipe.output)), transformers_bars(progress):
        return train_recipe(recipe, resume, force, console, progress)


@contextlib.contextmanager
def transformers_bars(progress: bool):
    """Without progress bars, none of transformers' either (loading weights, writing shards), for the block."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on and not progress:
            hf_logging.enable_progress_bar()


def student_record(recipe: Recipe, stage, result, previous: str | None, processes: int) -> dict:
    """What a saved student's kdistill.json says of how it was made."""
    teacher = stage.teacher.model or f"cache:{stage.teacher.path}"
    if os.path.exists(teacher):  # a local folder: absolute, so the record names it from any directory
        teacher = os.path.abspath(teacher)
    return {
        "kdistill_version": _version(), "recipe": recipe.name, "stage": stage.name, "teacher": teacher,
        "student_init": stage.student.model_dump(exclude_none=True) if stage.student else {"previous_stage": previous},
        "steps": result.steps, "wall_time_s": round(result.wall_time_s, 2), "processes": processes,
        "metrics": {"train": result.final_train, "eval": result.final_eval},
        "config": stage.model_dump(mode="json", exclude_none=True),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def train_recipe(recipe: Recipe, resume: bool, force: bool, console, progress: bool) -> Path:
    from kdistill.engine.build import build_stage
    from kdistill.engine.logs import plot_losses
    from kdistill.engine.loop import StageTrainer

    first = next((s for s in recipe.stages if s.synthesize is None), recipe.stages[0])
    accelerator = make_accelerator(first.train.precision)
    pending_recipe = open_run_dir(recipe, resume, force, accelerator, console)

    def accept_recipe() -> None:
        """A forced resume's recipe becomes the run's once a stage has accepted its checkpoint (or starts anew)."""
        nonlocal pending_recipe
        if accelerator.is_main_process and pending_recipe is not None:
            (Path(recipe.output) / "config.resolved.yaml").write_text(pending_recipe)
            pending_recipe = None

    out = Path(recipe.output)
    previous: str | None = None
    history = []
    # a recipe that only synthesizes returns its data directory instead of a student
    trains = any(s.synthesize is None for s in recipe.stages)
    final = out / "student" if trains else synthesis_dir(out, recipe.stages[-1])
    if resume and trains and is_complete(final):  # an earlier stage's student deleted since is not trained again
        return final
    done = finished_stages(recipe) if resume else set()
    for index, stage in enumerate(recipe.stages):
        if stage.synthesize is not None:  # makes data on the main process; the student is untouched
            accept_recipe()
            if accelerator.is_main_process:
                run_synthesize_stage(stage, index, recipe, out, resume, console, progress)
            accelerator.wait_for_everyone()
            continue
        target = stage_student_dir(out, recipe, index)
        prefix = f"stages[{index}]." if len(recipe.stages) > 1 else ""
        if index in done:
            previous = str(target)  # a finished stage is not trained again
            continue
        if stage.lion is not None:  # rounds of answers, training, judging and writing; a student at the end
            accept_recipe()
            previous = str(run_lion_stage(stage, index, recipe, out, resume, previous, accelerator, console, progress))
            if accelerator.is_main_process:
                plot_losses(out)
            continue
        declared = stage
        stage = with_stage_data(with_stage_teacher(stage, out, recipe), out, recipe, prefix)
        parts = build_stage(stage, None if (stage.student is not None and index > 0) else previous, prefix, console,
                            generated=uses_stage_data(declared, ("train",)), progress=progress)
        if not history:
            check_later_quantization(parts.student, recipe, index)
        trainer = StageTrainer(parts, stage, out, accelerator, console=console, progress=progress, declared=declared,
                               force=force)
        resumed = resume and trainer.resume()
        accept_recipe()
        if resumed and console is not None and accelerator.is_main_process:
            console.print(f"resuming stage {stage.name!r} at step {trainer.step}"
                          + (" under the changed recipe (--force): its learning rate, weight decay and schedule from "
                             "here on" if trainer.resumed_under_changes else ""))
        elif resume and console is not None and accelerator.is_main_process and trained_anything(out):
            console.print(f"stage {stage.name!r} has no checkpoint to resume from: training it from step 0")
        result = trainer.fit()
        accelerator.wait_for_everyone()
        history.append({"stage": stage.name, "steps": result.steps, "wall_time_s": round(result.wall_time_s, 2),
                        "train": result.final_train, "eval": result.final_eval, "resumed": bool(resumed)})
        if accelerator.is_main_process:
            from kdistill.models.theseus import successor_only

            student = successor_only(accelerator.unwrap_model(trainer.model).student)
            metadata = student_record(recipe, stage, result, previous, accelerator.num_processes)
            save_student(student, parts.tokenizer, target, teacher_dir=parts.teacher_dir, metadata=metadata)
            plot_losses(out)
        accelerator.wait_for_everyone()
        previous = str(target)
    return final


def check_later_quantization(student, recipe: Recipe, index: int) -> None:
    """A later stage that quantizes this student is refused now, not after the stages before it have trained."""
    from kdistill.quant.model import check_quantizable

    for later, stage in enumerate(recipe.stages[index + 1:], index + 1):
        if stage.quant is not None and stage.student is None and stage.synthesize is None and stage.lion is None:
            check_quantizable(student, f"stages[{later}].quant")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdistill")
    except PackageNotFoundError:
        return "dev"

