"""`kdistill compare`: recipes against a no-teacher baseline, over seeds, on held-out test data.

The baseline of a recipe is the same student with the same initialisation, trained on the labels of
the recipe's last (task) stage only, for as many steps as all the recipe's stages together: the
distilled student has to beat a baseline that got every step it got, not a weakened one.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from kdistill.config import Recipe, Stage, load_recipe
from kdistill.errors import ConfigError

QUICK_DIVISOR = 8  # --quick: an eighth of every stage's steps, for a fast look at the direction


def baseline_of(recipe: Recipe) -> Recipe:
    from kdistill.losses.logits import CrossEntropyParams

    from kdistill.config import StudentConfig

    first, last = recipe.stages[0], recipe.stages[-1]
    steps = sum(s.train.steps for s in recipe.stages)
    student = first.student
    if student.theseus is not None:  # the same successor blocks, as a plain layer-subset student
        student = StudentConfig(from_teacher={"layers": "uniform", "num_layers": student.theseus.modules})
    stage = Stage(name="baseline", teacher=first.teacher.model_copy(update={"task": "classification"}),
                  student=student, data=last.data, losses=[CrossEntropyParams()],
                  train=last.train.model_copy(update={"steps": steps}))
    return Recipe(name=f"{recipe.name}-baseline", output=recipe.output, stages=[stage])


def variant(recipe: Recipe, seed: int, quick: bool, output: Path) -> Recipe:
    stages = [s.model_copy(update={"train": s.train.model_copy(update={
        "seed": seed, "steps": max(1, s.train.steps // QUICK_DIVISOR) if quick else s.train.steps})})
        for s in recipe.stages]
    return Recipe(name=recipe.name, output=str(output), stages=stages)


def test_records(recipe: Recipe) -> list[dict]:
    from kdistill.data import load_records

    last = recipe.stages[-1]
    source = last.data.eval or last.data.train
    specs = source if isinstance(source, list) else [source]
    records = []
    for spec in specs:
        fields = {k: v for k, v in spec.model_dump(exclude_none=True).items() if k not in ("split", "limit")}
        records += load_records({**fields, "split": "test"}, "test")
    return records


def test_accuracy(model_dir: str, records: list[dict]) -> tuple[float, object]:
    from kdistill.eval.metrics import accuracy
    from kdistill.models.loading import load_model

    loaded = load_model(model_dir, "classification")
    config = loaded.model.config
    names = [config.id2label[i] for i in range(config.num_labels)]
    return accuracy(loaded.model, loaded.tokenizer, records, names), loaded


def train_or_reuse(recipe: Recipe, console) -> Path:
    from kdistill.engine.export import is_complete
    from kdistill.engine.run import run_recipe

    student = Path(recipe.output) / "student"
    if not is_complete(student):
        run_recipe(recipe, resume=(Path(recipe.output) / "config.resolved.yaml").exists(), console=console)
    return student


def compare(names: list[str], seeds: int = 3, quick: bool = False, output: str = "runs/compare",
            results: str = "docs/results.md", console=None) -> dict:
    from kdistill.eval.embeddings import compare_speed
    from kdistill.eval.metrics import count_parameters
    from kdistill.teachers.recipe_runs import resolve_teacher

    if not names:
        raise ConfigError("compare needs at least one recipe name or file")
    root = Path(output) / ("quick" if quick else "full")
    rows, teacher_row = [], None
    done_baselines: dict[str, str] = {}
    for name in names:
        recipe = load_recipe(name)
        base = baseline_of(recipe)
        key = json.dumps(base.stages[0].model_dump(mode="json"), sort_keys=True)
        pairs = [(recipe.name, recipe)] + ([] if key in done_baselines else [(base.name, base)])
        done_baselines.setdefault(key, base.name)
        records = test_records(recipe)
        teacher_ref = resolve_teacher(recipe.stages[-1].teacher.model, console)
        if teacher_row is None:
            acc, teacher = test_accuracy(teacher_ref, records)
            teacher_row = {"name": "teacher", "ref": recipe.stages[-1].teacher.model, "accuracy": [acc],
                           "params": count_parameters(teacher.model)}
        for label, r in pairs:
            accs, walls, student_dir = [], [], None
            for seed in range(seeds):
                run = variant(r, seed, quick, root / label / f"seed-{seed}")
                start = time.perf_counter()
                student_dir = train_or_reuse(run, console)
                meta = json.loads((student_dir / "kdistill.json").read_text())
                walls.append(meta.get("wall_time_s") or time.perf_counter() - start)
                acc, loaded = test_accuracy(str(student_dir), records)
                accs.append(acc)
                if console is not None:
                    console.print(f"{label} seed {seed}: test accuracy {acc:.4f}")
            texts = [r_["text"] for r_ in records[:128]]
            speed = compare_speed({"teacher": (teacher.model, teacher.tokenizer, "cls"),
                                   "student": (loaded.model, loaded.tokenizer, "cls")}, texts)
            rows.append({"name": label, "baseline_of": name if label.endswith("-baseline") else None,
                         "accuracy": accs, "params": count_parameters(loaded.model),
                         "speedup": speed["student"] / speed["teacher"], "wall_time_s": walls,
                         "steps": sum(s.train.steps for s in run.stages)})
    report = {"quick": quick, "seeds": seeds, "test_records": len(records), "teacher": teacher_row, "rows": rows,
              "created": time.strftime("%Y-%m-%d %H:%M")}
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(report, indent=2))
    write_results(report, Path(results), names)
    return report


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown(report: dict) -> str:
    teacher = report["teacher"]
    t_acc = teacher["accuracy"][0]
    lines = [f"Test accuracy on {report['test_records']} held-out records, {report['seeds']} seed(s)"
             f"{' (--quick: 1/8 of the steps)' if report['quick'] else ''}; measured {report['created']}.", "",
             "| model | test accuracy | % of teacher | parameters | speed-up | steps | train wall time (s) |",
             "|---|---|---|---|---|---|---|",
             f"| teacher ({teacher['ref']}) | {t_acc:.4f} | 100% | {teacher['params']:,} | 1.00× | | |"]
    for row in report["rows"]:
        m, s = mean_std(row["accuracy"])
        lines.append(f"| {row['name']} | {m:.4f} ± {s:.4f} | {m / t_acc:.1%} | {row['params']:,} | "
                     f"{row['speedup']:.2f}× | {row['steps']} | {statistics.mean(row['wall_time_s']):.0f} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"name": "teacher", "accuracy": report["teacher"]["accuracy"]}] + report["rows"]
    means = [mean_std(r["accuracy"]) for r in rows]
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 4))
    ax.bar([r["name"] for r in rows], [m for m, _ in means], yerr=[s for _, s in means], capsize=4,
           color=["#555"] + ["#bbb" if r.get("baseline_of") else "#3a7" for r in rows[1:]])
    low = min(m for m, _ in means)
    ax.set(ylabel="test accuracy", ylim=(max(0, low - 0.05), min(1, max(m for m, _ in means) + 0.02)))
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(report: dict, path: Path, names: list[str]) -> None:
    """Replace (or add) this comparison's section of docs/results.md, and its PNG beside it."""
    slug = "-".join(Path(n).stem for n in names) + ("-quick" if report["quick"] else "")
    png = path.parent / f"results-{slug}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    plot(report, png)
    start, end = f"<!-- compare:{slug} -->", f"<!-- /compare:{slug} -->"
    section = (f"{start}\n## compare {' '.join(names)}{' --quick' if report['quick'] else ''}\n\n"
               f"{markdown(report)}\n\n![{slug}]({png.name})\n{end}")
    text = path.read_text() if path.exists() else "# Results\n\nWritten by `kdistill compare`.\n"
    if start in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
