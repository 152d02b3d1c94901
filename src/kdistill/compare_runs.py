"""Which recipes a comparison can score, which runs it trains and which it reuses: each recipe's no-teacher
baseline (built from the recipe, kept by content so any later comparison asking for the same one finds it), the
per-seed variants, and the reuse of finished runs and of the leading stages an edit left alone.

The baseline of a recipe is the same student with the same initialisation, trained on the labels of
the recipe's last (task) stage only, for as many steps as all the recipe's stages together: the
distilled student has to beat a baseline that got every step it got, not a weakened one.
"""
from __future__ import annotations

import json
from pathlib import Path

from kdistill.config import Recipe, Stage, load_recipe
from kdistill.errors import ConfigError

QUICK_DIVISOR = 8  # --quick: an eighth of every stage's steps, for a fast look at the direction
METRICS = {"classification": "accuracy", "image-classification": "accuracy", "causal-lm": "ROUGE-L"}


def recipe_task(recipe: Recipe) -> str:
    """What the final student is scored as: the last stage teacher's task; `auto` is read from a teacher
    directory's config (a `recipe:NAME` teacher may not be trained yet: classification)."""
    last = recipe.stages[-1].teacher
    if last.task != "auto":
        return last.task
    if last.model is None or last.model.startswith(("recipe:", "stage:")):
        return "classification"
    from kdistill.models.loading import detect_task, load_config

    return detect_task(load_config(last.model, last.trust_remote_code)[1])


def quick_steps(steps: int) -> int:
    return max(1, steps // QUICK_DIVISOR)


def baseline_of(recipe: Recipe, quick: bool = False) -> Recipe:
    """The recipe's no-teacher baseline, with as many steps as all its stages together (under --quick, as all its
    shortened stages: an eighth of their sum would differ by the rounding of each stage). Its steps are final: a
    baseline goes through `variant` without --quick."""
    from kdistill.losses.logits import CrossEntropyParams

    from kdistill.config import StudentConfig

    first, last = recipe.stages[0], recipe.stages[-1]
    steps = sum(quick_steps(s.train.steps) if quick else s.train.steps for s in recipe.stages)
    student = first.student
    if student.theseus is not None:  # the same successor blocks, as a plain layer-subset student
        spec = student.theseus
        init = ({"layers": "uniform", "num_layers": spec.modules} if spec.successors == "top"
                else {"layers": list(range(1, spec.modules + 1))})
        student = StudentConfig(from_teacher={**init, "layers_from": spec.layers_from})
    teacher = first.teacher.model_copy(update={"task": recipe_task(recipe)})
    if teacher.model is not None:  # the baseline never asks the teacher: no store to build, one baseline shared
        teacher = type(teacher)(model=teacher.model, task=teacher.task, trust_remote_code=teacher.trust_remote_code)
    stage = Stage(name="baseline", teacher=teacher,
                  student=student, data=without_text_augment(last.data), losses=[CrossEntropyParams()],
                  train=last.train.model_copy(update={"steps": steps}))
    return Recipe(name=f"{recipe.name}-baseline", output=recipe.output, stages=[stage])


def without_text_augment(data):
    """The baseline reads the plain records. TinyBERT's synonym-replaced copies are part of its method (the
    teacher labels each copy as it reads it); with labels only, each copy takes its gloss's label whether or not
    the swapped words still fit it, and such copies cost a labels-only student about a point (docs/encoders.md,
    "The transfer set"). A baseline trained on them would be weakened, not matched."""
    train = data.train if isinstance(data.train, list) else [data.train]
    plain = [source.model_copy(update={"augment": None}) for source in train]
    return data.model_copy(update={"train": plain if isinstance(data.train, list) else plain[0]})


def baseline_key(baseline: Recipe) -> str:
    """What makes two baselines the same run: their stage with `uniform` / `every_other` written as the
    teacher layers they pick (DistilBERT's every_other is MiniLM's [2, 4, 6]), apart from how often it
    evaluates, logs and saves (none of which changes a weight)."""
    from kdistill.config import BOOKKEEPING

    stage = baseline.stages[0]
    dump = stage.model_dump(mode="json")
    spec = stage.student.from_teacher
    if spec is not None and isinstance(spec.layers, str) and (spec.model or stage.teacher.model) is not None:
        from kdistill.models.arch import layer_count
        from kdistill.models.loading import load_config
        from kdistill.models.student import choose_layers
        from kdistill.teachers.recipe_runs import resolve_teacher

        source = spec.model or resolve_teacher(stage.teacher.model, None)
        config = load_config(source, trust_remote_code=stage.teacher.trust_remote_code)[1]
        dump["student"]["from_teacher"].update(
            layers=choose_layers(spec.layers, spec.num_layers, layer_count(config), "student.from_teacher"),
            num_layers=None)
    for field in BOOKKEEPING:
        dump["train"].pop(field, None)
    return json.dumps(dump, sort_keys=True)


def baseline_dir(root: Path, baseline: Recipe, key: str) -> Path:
    """Baselines live by content (`baselines/<hash of their baseline_key>`), so every later compare whose
    recipe asks for the same baseline (a sweep of one recipe's loss settings) reuses it instead of training
    it again, and an edited recipe's baseline never replaces the earlier one. A folder named after the
    recipe (`<name>-baseline`, where earlier versions kept baselines) moves there if it holds this baseline,
    and so does a folder filed under an older key of the same run (a field added to the recipe schema since
    changes every key: its default changes no weight)."""
    import hashlib

    from kdistill.recipe_diff import read_saved, recipe_changes

    folder = root / "baselines" / hashlib.sha256(key.encode()).hexdigest()[:16]
    legacy = root / baseline.name
    saved = legacy / "seed-0" / "config.resolved.yaml"
    if not folder.exists() and saved.exists():
        before = read_saved(saved)
        if before is not None and not recipe_changes(before, variant(baseline, 0, False, saved.parent)):
            folder.parent.mkdir(parents=True, exist_ok=True)
            legacy.rename(folder)
    if not folder.exists():
        same = baseline_key(variant(baseline, 0, False, folder / "seed-0"))
        for other in sorted(folder.parent.glob("*/seed-0")):
            kept = saved_recipe(other)
            if kept is not None and baseline_key(kept) == same:
                other.parent.rename(folder)
                break
    return folder


def saved_recipe(run_dir: Path) -> Recipe | None:
    """The recipe a run folder was trained from, as this kdistill reads it (fields added since take their
    defaults); None where there is none, or it no longer validates (written by an older kdistill)."""
    from kdistill.recipe_diff import read_saved

    saved = read_saved(Path(run_dir) / "config.resolved.yaml")
    if saved is None:
        return None
    try:
        return load_recipe(saved, output=str(run_dir))
    except ConfigError:
        return None


def kept_baseline(run: Recipe) -> Recipe:
    """A baseline folder holds the runs of every recipe with that baseline key, written as the first of them
    spelled it (DistilBERT's `every_other` baseline is MiniLM's `[2, 4, 6]` one): such a run is this one, so
    it is reused as written rather than trained again for a spelling."""
    kept = saved_recipe(Path(run.output))
    return kept if kept is not None and baseline_key(kept) == baseline_key(run) else run


def variant(recipe: Recipe, seed: int, quick: bool, output: Path) -> Recipe:
    """The recipe as compare runs it: this seed, --quick's steps, and one dev evaluation per stage, at its end
    (the table scores the test split itself; in the encoder comparison the mid-stage evaluations took 102 s of
    a seed's 47 minutes). Evaluation changes no weight, so runs made with them are still reused."""
    stages = [s.model_copy(update={"train": s.train.model_copy(update={
        "seed": seed, "steps": quick_steps(s.train.steps) if quick else s.train.steps,
        "eval_every": None})})
        for s in recipe.stages]
    return Recipe(name=recipe.name, output=str(output), stages=stages)


def train_or_reuse(recipe: Recipe, console, progress: bool = True) -> Path:
    """A finished run of exactly this recipe is reused; a run of an edited recipe is trained again, from
    the end of the leading stages the edit left as they were (editing a task stage keeps the general one)."""
    import shutil

    from kdistill.engine.export import is_complete
    from kdistill.engine.run import run_recipe
    from kdistill.recipe_diff import read_saved, recipe_changes

    out = Path(recipe.output)
    student = out / "student"
    resolved = out / "config.resolved.yaml"
    before = read_saved(resolved)
    if before is not None and recipe_changes(before, recipe):
        edited = out.with_name(out.name + ".edited")
        shutil.rmtree(edited, ignore_errors=True)
        out.rename(edited)
        try:
            kept = reuse_shared_stages(recipe, [load_recipe(before, output=str(edited))])
        except ConfigError:  # written by an older kdistill whose recipe no longer validates
            kept = []
        shutil.rmtree(edited)
        if console is not None:
            console.print(f"{recipe.name}: the recipe changed since {out} was trained; training it again"
                          + (f" from the end of its unchanged stages ({', '.join(kept)})" if kept else ""))
    if not is_complete(student):
        run_recipe(recipe, resume=resolved.exists(), console=console, progress=progress)
    # a finished run is reused through its students; its checkpoints (400 MB for a 3-layer MiniLM student)
    # filled this machine's disk over the 39 runs of the encoder comparison
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return student


def reuse_shared_stages(run: Recipe, finished: list[Recipe]) -> list[str]:
    """Give a run that has not started the finished leading stages it shares with an earlier run of the
    same compare (equal stage blocks, seed included; never the last stage, whose student is the run's
    result): BinaryBERT's W1A8 and W1A1 pipelines share their two FP stages. Training is deterministic
    (the same stage trained twice gives the same bytes), so this is the run it would have been, minus the
    time. Returns the names of the stages copied."""
    import shutil

    from kdistill.engine.export import is_complete
    from kdistill.engine.run_dir import prepare_run_dir
    from kdistill.engine.stage_refs import stage_student_dir

    out = Path(run.output)
    if (out / "config.resolved.yaml").exists():
        return []  # started already: its own resume decides
    best, source = 0, None
    for other in finished:
        shared = leading_stages_alike(run, other)
        while shared and not is_complete(stage_student_dir(Path(other.output), other, shared - 1)):
            shared -= 1
        if shared > best:
            best, source = shared, other
    if source is None:
        return []
    prepare_run_dir(run, resume=False, force=False)  # its saved recipe (first: it makes the folder a run's)
    for stage in run.stages[:best]:
        shutil.copytree(Path(source.output) / "stages" / stage.name, out / "stages" / stage.name)
        log = Path(source.output) / "logs" / f"{stage.name}.jsonl"
        if log.exists():
            (out / "logs").mkdir(exist_ok=True)
            shutil.copy2(log, out / "logs" / log.name)
    return [stage.name for stage in run.stages[:best]]


def leading_stages_alike(run: Recipe, other: Recipe) -> int:
    """How many leading stages two runs have alike (seed included; how often a stage evaluates, logs or saves
    changes no weight), never counting either run's last stage, whose student is that run's result."""
    from kdistill.config import BOOKKEEPING, diff_configs

    shared = 0
    while (shared < min(len(run.stages), len(other.stages)) - 1
           and not diff_configs(other.stages[shared].model_dump(mode="json"),
                                run.stages[shared].model_dump(mode="json"), ignore=BOOKKEEPING)):
        shared += 1
    return shared


def asks_teacher(stage) -> bool:
    """Whether a stage runs its teacher: a loss reads it, it trains in the loop, or its blocks are in a hybrid."""
    from kdistill.losses import LOSSES

    hybrid = stage.student is not None and stage.student.theseus is not None
    return hybrid or stage.teacher.update is not None or any(LOSSES.get(p.type).needs_teacher for p in stage.losses)


def comparable_recipes(names: list[str]) -> tuple[list[Recipe], Recipe]:
    """The named recipes and the one whose teacher the table shows, each refused here, before any training, when
    `compare` cannot score it."""
    recipes = [load_recipe(name) for name in names]
    for name, recipe in zip(names, recipes):  # their own commands, before the checks that assume a teacher
        if any(getattr(s, "lion", None) is not None for s in recipe.stages):
            raise ConfigError(f"{name} runs Lion rounds; compare it with `kdistill compare-lion` (ROUGE-L per round "
                              f"against plain imitation), not `kdistill compare`")
        if any(getattr(s, "synthesize", None) is not None for s in recipe.stages):
            raise ConfigError(f"{name} synthesizes its training data; compare it with `kdistill compare-pad` "
                              f"(execution accuracy), not `kdistill compare`")
    distilling = [r for r in recipes if any(map(asks_teacher, r.stages))]
    if not distilling:  # a teacher recipe's `teacher:` is the model it starts from, not a reference to score
        raise ConfigError(f"none of {', '.join(names)} distils from a teacher (each trains on labels only, like a "
                          f"teacher recipe or a baseline); compare scores distillation recipes against their "
                          f"no-teacher baselines: name at least one (e.g. one whose teacher is recipe:{names[0]})")
    # the table's teacher: the first fixed one (a ProKT teacher may start untrained and learn in the loop)
    reference = next((r for r in distilling if r.stages[-1].teacher.update is None), distilling[0])
    for name, recipe in zip(names, recipes):
        task = recipe_task(recipe)
        if task not in METRICS:  # refused before any training, not after it
            raise ConfigError(f"compare scores {', '.join(METRICS)} students by their test metric; {name}'s "
                              f"teacher task is {task!r}; such students are compared by fidelity to "
                              f"the teacher instead: `kdistill eval --student DIR --teacher TEACHER --data ...`")
    return recipes, reference
