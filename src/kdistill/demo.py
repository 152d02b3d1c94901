"""`kdistill demo`: distill the packaged all-MiniLM-L6-v2 into a 3-layer student and show what it kept.

The table puts the teacher, the student as initialised (teacher layers copied, before training) and
the distilled student side by side, on held-out docstrings and WordNet glosses (the training domains)
and on software-license paragraphs, a domain the demo never trains on.
"""
from __future__ import annotations

import json
from pathlib import Path

from kdistill.errors import DataError

RECIPE = "minilm-l3"
EVAL_SETS = [{"source": "stdlib-docstrings", "split": "eval"}, {"source": "wordnet-glosses", "split": "eval"},
             {"source": "license-texts", "split": "train"}]  # licenses are never trained on: all of them are unseen
DOMAINS = {"stdlib-docstrings": "held-out, train domain", "wordnet-glosses": "held-out, train domain",
           "license-texts": "unseen domain"}


def save_initial_student(recipe, target: Path) -> None:
    """The student exactly as the recipe initialises it, for the 'before training' column."""
    from kdistill.engine.export import is_complete, save_student
    from kdistill.models.loading import load_model
    from kdistill.models.student import build_student

    if is_complete(target):
        return
    stage = recipe.stages[0]
    teacher = load_model(stage.teacher.model, stage.teacher.task, stage.teacher.trust_remote_code)
    student = build_student(stage.student, teacher.model, teacher.task, stage.train.seed)
    save_student(student, teacher.tokenizer, target, teacher_dir=teacher.path,
                 metadata={"recipe": recipe.name, "steps": 0, "note": "student at initialisation"})


def available_eval_sets() -> list[dict]:
    from kdistill.data import load_records

    sets = []
    for spec in EVAL_SETS:
        try:
            load_records({**spec, "limit": 1})
            sets.append(spec)
        except DataError:
            pass  # wordnet-base or Debian's license texts missing: report the others
    return sets


def render(teacher_ref: str, init: dict, final: dict):
    from rich.table import Table

    table = Table(title="MiniLM-L6 teacher vs 3-layer student (held-out text)")
    for col in ("", "teacher", "student at init", "distilled student"):
        table.add_column(col, justify="right" if col else "left")
    models = final["models"]
    table.add_row("parameters", f"{models['teacher']['params']:,}", f"{init['models']['student']['params']:,}",
                  f"{models['student']['params']:,}")
    table.add_row("size on disk (MB)", f"{models['teacher']['size_mb']:.1f}", f"{init['models']['student']['size_mb']:.1f}",
                  f"{models['student']['size_mb']:.1f}")
    if final.get("speedup"):
        table.add_row("encode speed (texts/s)", f"{models['teacher']['texts_per_s']:.0f}", "same as distilled",
                      f"{models['student']['texts_per_s']:.0f} ({final['speedup']:.2f}×)")
    for name, entry in final["datasets"].items():
        before = init["datasets"][name]
        domain = DOMAINS.get(name, "held-out")
        table.add_section()
        table.add_row(f"[bold]{name}[/] ({domain}, n={entry['n']})", "", "", "")
        for key, label in (("cosine", "cosine to teacher"), ("spearman", "pairwise-similarity Spearman"),
                           ("recall_at_10", "neighbour recall@10")):
            table.add_row(f"  {label}", "1.000", *("—" if v is None else f"{v:.3f}" for v in (before[key], entry[key])))
    return table


def run_demo(console, steps: int | None = None, output: str = "runs/demo", resume: bool = False,
             limit: int = 512, extra_overrides: tuple[str, ...] = ()) -> dict:
    from kdistill import load_recipe
    from kdistill.engine.run import run_recipe
    from kdistill.eval.report import evaluate

    overrides = ([f"train.steps={steps}"] if steps is not None else []) + list(extra_overrides)
    recipe = load_recipe(RECIPE, overrides, output)
    out = Path(recipe.output)
    console.print(f"[bold]kdistill demo[/]: {recipe.stages[0].teacher.model} -> 3-layer student, "
                  f"{recipe.stages[0].train.steps} steps on stdlib docstrings + WordNet glosses; run directory {out}")
    # a finished demo resumes at once; a folder holding another recipe's run is refused by name, not shown as the demo
    student = run_recipe(recipe, resume=resume, console=console)
    init_dir = out / "student-init"
    save_initial_student(recipe, init_dir)
    console.print("evaluating teacher, student at init and distilled student ...")
    teacher = recipe.stages[0].teacher.model
    sets = available_eval_sets()
    init = evaluate(str(init_dir), teacher, sets, limit=limit, speed=False)
    final = evaluate(str(student), teacher, sets, limit=limit, speed=True)
    console.print(render(teacher, init, final))
    report = {"recipe": recipe.dump(), "student_at_init": init, "distilled": final,
              "train": json.loads((student / "kdistill.json").read_text()).get("metrics")}
    (out / "demo.json").write_text(json.dumps(report, indent=2, default=str))
    console.print(f"student: {student}  (AutoModel.from_pretrained / SentenceTransformer load it)  report: {out / 'demo.json'}")
    return report
