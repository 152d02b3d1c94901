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
import re
import time
from pathlib import Path

import yaml

from kdistill.config import Recipe, recipe_changes
from kdistill.engine.export import is_complete, save_student
from kdistill.engine.stage_refs import (stage_student_dir, synthesis_dir, uses_stage_data, with_block_teacher,
                                       with_stage_data, with_stage_teacher)
from kdistill.errors import CheckpointError, ConfigError, KdistillError


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


def trained_anything(out: Path) -> bool:
    """A run folder holds training only once a checkpoint, a stage or a student is in it: a command that
    failed while building its first stage (a missing data file) left only its recipe, and is no run to keep."""
    return any((out / name).exists() for name in ("checkpoints", "stages", "student"))


def prepare_run_dir(recipe: Recipe, resume: bool, force: bool) -> str | None:
    """Refuse to overwrite a run unless resuming it, and refuse to resume it with a different recipe. Returns the
    recipe text still to be saved as config.resolved.yaml when a forced resume changed the recipe: it is written
    only once a stage has accepted its checkpoint, so a refused resume leaves the run's own recipe in place."""
    out = Path(recipe.output)
    resolved = out / "config.resolved.yaml"
    current = recipe.dump()
    changed: list[str] = []
    check_not_foreign(out)
    if resolved.exists() and trained_anything(out):
        if not resume:
            raise ConfigError(
                f"{out} already holds a run; pass --resume to continue it, or choose another --output"
            )
        try:
            previous = yaml.safe_load(resolved.read_text())
        except (OSError, ValueError, yaml.YAMLError):  # ValueError: bytes that are not UTF-8
            previous = None
        if not isinstance(previous, dict):
            if not force:
                raise CheckpointError(f"{resolved} is corrupt; cannot tell which recipe wrote this run. Pass --resume "
                                      f"--force to continue it with this recipe, or choose another --output")
            changed = [f"{resolved} was unreadable"]
        else:
            changed = recipe_changes(previous, recipe)
        finished = is_complete(out / "student")
        if changed and not force:  # --force cannot continue a finished run (below), so it is offered only to others
            raise CheckpointError(
                f"cannot resume {out}: the recipe differs from the one that started it:\n  "
                + "\n  ".join(changed) + ("\nthat run is finished: undo those changes, or choose another --output"
                                          if finished else "\nundo those changes, or pass --force to resume anyway")
            )
        if changed and finished:
            raise CheckpointError(
                f"{out} holds a finished run, trained by the recipe before these changes ({'; '.join(changed[:3])}); "
                f"--force continues an interrupted run, and this one's student is final (its checkpoints, if it kept "
                f"any, end before its last step): to train that student further, start a new run from it "
                f"(student: {{model: {out / 'student'}}}) with another --output")
        if changed and isinstance(previous, dict):
            check_finished_stages_unchanged(recipe, previous, current, out)
    text = yaml.safe_dump(current, sort_keys=False)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not changed:
            resolved.write_text(text)
    except OSError as err:
        raise ConfigError(f"output {out}: cannot write the run there ({err.strerror or err}); choose another "
                          f"--output") from None
    return text if changed else None


def check_finished_stages_unchanged(recipe: Recipe, previous: dict, current: dict, out: Path) -> None:
    """A forced resume trains no finished stage again, so a change to one would be recorded but never applied."""
    from kdistill.recipe_diff import BOOKKEEPING, diff_configs

    old_stages = previous.get("stages")
    if not isinstance(old_stages, list) or len(old_stages) != len(current["stages"]):
        return  # the stages themselves changed: the checkpoints' own hashes refuse what does not fit
    for index, (old, new) in enumerate(zip(old_stages, current["stages"])):
        if is_complete(stage_student_dir(out, recipe, index)):
            differences = diff_configs(old, new, f"stages.{index}", ignore=BOOKKEEPING)
            if differences:
                raise CheckpointError(
                    f"cannot resume {out}: stage {recipe.stages[index].name!r} is finished, trained by the recipe "
                    f"before these changes ({'; '.join(differences[:3])}), and a resumed run does not train it "
                    f"again: undo them, or choose another --output")


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


@contextlib.contextmanager
def run_lock(out: Path):
    """One command at a time trains a run folder: a second `run` of it, or a compare started again while an earlier
    one (or its workers) still trains, would write the same checkpoints over each other."""
    from kdistill.engine.locks import folder_lock

    def refuse(lock_file: str):
        raise ConfigError(f"output {out} is being trained by another kdistill command (it holds {lock_file}); "
                          f"wait for it to end, or choose another --output")

    def unwritable(err: OSError):
        raise ConfigError(f"output {out}: cannot write the run there ({err.strerror or err}); choose another "
                          f"--output") from None

    with folder_lock(out, "run.lock", refuse, unwritable, first_process_holds=True):
        yield


def check_not_foreign(out: Path) -> None:
    """A folder that is neither new, empty nor a kdistill run is refused: the run's student/ and checkpoints/ would
    be written over what is there. A teacher store written into it (cache-teacher's and cache-api-teacher's default
    --out) and an API store's answer cache beside that store are no obstacle."""
    from kdistill.teachers.store_writer import is_store

    if not out.is_dir() or (out / "config.resolved.yaml").exists():
        return
    if (out / "checkpoints").is_dir():  # a run whose saved recipe is gone: not someone else's folder
        raise ConfigError(f"output {out} holds a kdistill run's checkpoints but not its config.resolved.yaml, the "
                          f"recipe it ran: put that recipe back there (the same YAML) to --resume it, or choose a new "
                          f"folder for a new run")
    entries = list(out.iterdir())
    stores = {entry.name for entry in entries if is_store(entry)}
    caches = {f"{store}.teacher.sqlite{end}" for store in stores for end in ("", "-wal", "-shm", "-journal")}
    foreign = sorted(entry.name for entry in entries if entry.name not in stores | caches)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"output {out} is a folder that holds something other than a kdistill run ({shown}; no "
                          f"config.resolved.yaml); choose a new or empty folder for the run")


def check_output(out: Path) -> None:
    """An output that can never be a run folder, named before anything is built (`validate` calls it too)."""
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"output {out} is a link to {os.readlink(out)}, which does not exist; make that folder, or "
                          f"choose another --output")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file; choose another --output")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"output {out}: {parent} is a file, so no folder can be made there; choose another --output")


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


def open_run_dir(recipe: Recipe, resume: bool, force: bool, accelerator, console) -> str | None:
    """Prepare the run folder on the main process (prepare_run_dir); every process leaves together if it refuses.
    Returns the recipe text a forced resume writes once a stage accepts its checkpoint."""
    pending_recipe, refusal = None, None
    if accelerator.is_main_process:
        if resume and console is not None and not trained_anything(Path(recipe.output)):
            console.print(f"[yellow]nothing to resume in {recipe.output}[/yellow]: starting from step 0")
        kept = Path(recipe.output) / "checkpoints"
        # a Lion stage's rounds keep theirs as NAME-round-RR
        ours = re.compile("|".join(rf"{re.escape(s.name)}(-round-\d+)?" for s in recipe.stages))
        orphans = sorted(d.name for d in kept.iterdir() if d.is_dir() and not ours.fullmatch(d.name)
                         ) if resume and kept.is_dir() else []
        if orphans and console is not None:  # a stage renamed since: it starts over, which should not go unsaid
            console.print(f"[yellow]note[/yellow]: checkpoints of {', '.join(orphans)} belong to no stage of this "
                          f"recipe and are not used (a renamed stage starts from step 0; rename it back to resume it)")
        student = Path(recipe.output) / "student"
        if resume and console is not None and student.is_dir() and not is_complete(student):
            console.print(f"[yellow]{student} is damaged or incomplete[/yellow] (a file it was saved with is missing "
                          f"or of another size): its stage trains again from its last checkpoint (if any) and writes it anew")
        try:
            pending_recipe = prepare_run_dir(recipe, resume, force)
        except KdistillError as err:
            refusal = err
    if accelerator.num_processes > 1:
        # the other processes learn of a refusal here instead of dying at the next barrier with a traceback each
        from accelerate.utils import broadcast_object_list

        refused = broadcast_object_list([refusal is not None])[0]
        if refused:
            # all leave together, as at a run's end: a process that exits while another still reads the broadcast
            # closes the connection under it (gloo then aborts that one: "Connection closed", SIGABRT)
            accelerator.wait_for_everyone()
        if refused and not accelerator.is_main_process:
            raise SystemExit(2)  # the main process says why, once
    if refusal is not None:
        raise refusal
    accelerator.wait_for_everyone()
    return pending_recipe


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


def finished_stages(recipe: Recipe) -> set[int]:
    """Stages a resume does not run again: all when the final student is complete, else those whose student or
    synthesized data is."""
    from kdistill.api.synthesize import is_synthesized

    out = Path(recipe.output)
    if any(s.synthesize is None for s in recipe.stages) and is_complete(out / "student"):
        return set(range(len(recipe.stages)))
    return {i for i, s in enumerate(recipe.stages)
            if (is_synthesized(synthesis_dir(out, s)) if s.synthesize is not None
                else is_complete(stage_student_dir(out, recipe, i)))}


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
    for index, stage in enumerate(recipe.stages):
        if stage.synthesize is not None:  # makes data on the main process; the student is untouched
            accept_recipe()
            if accelerator.is_main_process:
                run_synthesize_stage(stage, index, recipe, out, resume, console, progress)
            accelerator.wait_for_everyone()
            continue
        target = stage_student_dir(out, recipe, index)
        prefix = f"stages[{index}]." if len(recipe.stages) > 1 else ""
        if resume and is_complete(target):
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

