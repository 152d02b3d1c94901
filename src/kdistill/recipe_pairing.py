"""What `kdistill validate` shows of each stage and, with --full, builds: the stage's teacher and (untrained) student
loaded and paired through the engine's own build_stage, without a training step. A later stage pairs with the
student an earlier one would hand it (saved here untrained), so a `stage:` teacher is checked too. Plain validate's
reference checks: kdistill.recipe_references."""
from __future__ import annotations

import tempfile

from kdistill.config import Recipe


def untrained_recipe(model) -> bool:
    from kdistill.teachers.recipe_runs import PREFIX, trained_recipe

    ref = str(model or "")
    return ref.startswith(PREFIX) and trained_recipe(ref) is None


def describe_and_pair(r: Recipe, full: bool, console) -> None:
    """One line per stage; with `full`, each stage that can be built now is built and its records and taps shown."""
    with tempfile.TemporaryDirectory() as tmp:
        previous, built = None, {}  # stage name -> its (untrained) student, saved: what a `stage:` teacher reads
        for i, stage in enumerate(r.stages):
            if stage.synthesize is not None:  # generates data; nothing to pair until it has run
                from kdistill.api.synthesize import describe

                console.print(f"stage {i} [bold]{stage.name}[/]: {describe(stage.synthesize)}", highlight=False)
                continue
            if full and "stage:" in str(stage.data.train):
                console.print(f"  (stage {i} trains on data an earlier stage synthesizes: not built by --full)")
                full_stage = False
            elif full and untrained_recipe(stage.teacher.model):
                # a check must not start a training (teacher-supersense: 1,500 steps); `run` trains it first
                console.print(f"  (stage {i}'s teacher {stage.teacher.model} is not trained yet: `kdistill run` trains "
                              f"it first; --full pairs the rest once it is)", highlight=False)
                full_stage = False
            else:
                full_stage = full
            ref = str(stage.teacher.model or "") if stage.teacher else ""
            teacher_stage = ref[len("stage:"):] if ref.startswith("stage:") else None
            if full_stage and teacher_stage is not None:
                full_stage = teacher_stage in built  # else that stage was not built here: nothing to pair with
            if getattr(stage, "lion", None) is not None:
                from kdistill.api.lion import describe as describe_lion

                console.print(f"stage {i} [bold]{stage.name}[/]: {describe_lion(stage.lion, stage)}", highlight=False)
            student = stage.student.kind()[0] if stage.student else "previous stage"
            losses = ", ".join(f"{p.type}×{p.weight:g}" for p in stage.losses)
            teacher = stage.teacher.model or f"cache:{stage.teacher.path}"
            console.print(f"stage {i} [bold]{stage.name}[/]: teacher {teacher}, student {student}, "
                          f"{stage.train.steps} steps, losses {losses}", highlight=False)
            if full_stage:
                from kdistill.engine.build import build_stage
                from kdistill.engine.run import transformers_bars
                from kdistill.teachers.store_build import with_live_teacher

                prefix = f"stages[{i}]." if len(r.stages) > 1 else ""
                if teacher_stage is not None:
                    stage = stage.model_copy(update={"teacher": stage.teacher.model_copy(update={
                        "model": built[teacher_stage]})})
                automatic_store = stage.teacher.source == "cache" and stage.teacher.path is None
                if automatic_store:
                    # the automatic store is the live teacher's outputs: pair with that teacher instead of
                    # building the store here (it can take as long as an epoch of the teacher); what a store
                    # cannot give was refused by check_references above
                    console.print("  (its teacher store is built on the first run; paired here with the live teacher)")
                    stage = with_live_teacher(stage)
                parts = build_stage(stage, previous if stage.student is None else None, prefix, console)
                console.print(f"  {len(parts.train_records)} train / {len(parts.eval_records)} eval records; "
                              f"taps: student {sorted(parts.student_taps)}, teacher {sorted(parts.teacher_taps)}",
                              highlight=False)
                previous = built[stage.name] = f"{tmp}/stage{i}"  # the next stage pairs with this (untrained) student
                with transformers_bars(False):  # an internal copy: no "Writing model shards" bar
                    parts.student.save_pretrained(previous)
                    parts.tokenizer.save_pretrained(previous)
