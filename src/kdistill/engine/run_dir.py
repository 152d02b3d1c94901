"""The run folder: what a new run or a resume finds in `output/` (engine.run), what it may do with it, and which
of its stages a resume does not run again."""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import yaml

from kdistill.config import Recipe
from kdistill.engine.export import is_complete
from kdistill.engine.stage_refs import stage_student_dir, synthesis_dir
from kdistill.errors import CheckpointError, ConfigError, KdistillError
from kdistill.recipe_diff import read_saved, recipe_changes


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
        previous = read_saved(resolved)
        if previous is None:
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
        if changed and previous is not None:
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


def open_run_dir(recipe: Recipe, resume: bool, force: bool, accelerator, console) -> str | None:
    """Prepare the run folder on the main process (prepare_run_dir); every process leaves together if it refuses.
    Returns the recipe text a forced resume writes once a stage accepts its checkpoint."""
    pending_recipe, refusal = None, None
    if accelerator.is_main_process:
        for note in resume_notes(Path(recipe.output), recipe) if resume and console is not None else []:
            console.print(note)
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


def resume_notes(out: Path, recipe: Recipe) -> list[str]:
    """What a resume should not do silently: start from step 0, leave a renamed stage's checkpoints unused, or train
    a stage again because its finished student was damaged since."""
    if not trained_anything(out):
        return [f"[yellow]nothing to resume in {out}[/yellow]: starting from step 0"]
    notes = []
    kept = out / "checkpoints"
    ours = re.compile("|".join(rf"{re.escape(s.name)}(-round-\d+)?" for s in recipe.stages))  # Lion: NAME-round-RR
    orphans = sorted(d.name for d in kept.iterdir() if d.is_dir() and not ours.fullmatch(d.name)) if kept.is_dir() else []
    if orphans:
        notes.append(f"[yellow]note[/yellow]: checkpoints of {', '.join(orphans)} belong to no stage of this recipe "
                     f"and are not used (a renamed stage starts from step 0; rename it back to resume it)")
    student = out / "student"
    if student.is_dir() and not is_complete(student):
        notes.append(f"[yellow]{student} is damaged or incomplete[/yellow] (a file it was saved with is missing or of "
                     f"another size): its stage trains again from its last checkpoint (if any) and writes it anew")
    return notes


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
