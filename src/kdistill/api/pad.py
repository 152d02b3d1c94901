"""Program-aided Distillation, measured: students trained on execution-filtered teacher programs (`pad`),
on every teacher program (`pad-unfiltered`) and on the answers alone (`pad-direct`), each over seeds,
scored by execution accuracy on held-out SYNTHETIC test problems.

    from kdistill.api.pad import compare_pad
    compare_pad(seeds=3, output="runs/pad-compare")   # writes pad-compare.md and pad-compare.json there

The synthesize stages depend only on `synthesize.sampling.seed`, never on the training seed, so each
variant synthesizes once: later seeds start from a copy of the first seed's finished synthesize stage,
and `pad` and `pad-unfiltered` share one generation cache, so the unfiltered variant trains on the very
candidates the filtered one judged. The pad-teacher is trained once (`recipe:pad-teacher`).
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

from kdistill.api.variants import split_overrides, variant_with_overrides
from kdistill.config import Recipe
from kdistill.errors import ConfigError

VARIANTS = {  # recipe -> how its student answers (what execution accuracy runs)
    "pad": "program",
    "pad-unfiltered": "program",
    "pad-direct": "answer",
}
LABELS = {
    "pad": "pad: programs kept by the execution filter",
    "pad-unfiltered": "pad-unfiltered: every sampled program",
    "pad-direct": "pad-direct: problem -> answer",
}


def variant_recipe(name: str, sets: list[str]) -> Recipe:
    """A variant's recipe with its overrides; a refusal names the variant (the same --set can suit one, not another)."""
    return variant_with_overrides(name, sets, "compare-pad", ("output", "train.seed"), "output and seed")


def seeded(recipe: Recipe, seed: int, output: Path, cache: Path) -> Recipe:
    """The recipe with this training seed and output, its synthesize stages on the shared cache."""
    stages = []
    for stage in recipe.stages:
        if stage.synthesize is not None:
            stage = stage.model_copy(update={"synthesize": stage.synthesize.model_copy(update={"cache": str(cache)})})
        else:
            stage = stage.model_copy(update={"train": stage.train.model_copy(update={"seed": seed})})
        stages.append(stage)
    return Recipe(name=recipe.name, output=str(output), stages=stages)


def run_seed(recipe: Recipe, first_run: Path | None, console, progress: bool) -> Path:
    """Train (or reuse) one seed's student; synthesize stages are copied from `first_run` when it has them."""
    from kdistill.api.synthesize import is_synthesized
    from kdistill.engine.export import is_complete
    from kdistill.engine.run import run_recipe
    from kdistill.engine.stage_refs import synthesis_dir

    out = Path(recipe.output)
    if is_complete(out / "student"):
        return out / "student"
    resume = (out / "config.resolved.yaml").exists()
    for stage in recipe.stages:
        if stage.synthesize is None or first_run is None:
            continue
        source, target = synthesis_dir(first_run, stage), synthesis_dir(out, stage)
        if is_synthesized(source) and not is_synthesized(target):
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
            resume = True  # the copied stage is complete, so the run goes straight to training
    return run_recipe(recipe, resume=resume, console=console, progress=progress)


def score(student: str | Path, mode: str, limit: int | None) -> dict:
    from kdistill.api.word_problems import problem_records
    from kdistill.eval.execution import execution_accuracy
    from kdistill.models.loading import load_model

    records = problem_records("test", mode)[:limit]
    loaded = load_model(str(student), "causal-lm")
    start = time.perf_counter()
    result = execution_accuracy(loaded.model, loaded.tokenizer, records, mode=mode)
    return {**result, "eval_wall_time_s": round(time.perf_counter() - start, 1)}


def training_rows(run: Path, recipe: Recipe) -> int:
    """Records the student trained on: the kept rows of a synthesize stage, or its data source's."""
    from kdistill.data import load_records
    from kdistill.engine.stage_refs import stage_student_dir

    meta = json.loads((stage_student_dir(run, recipe, len(recipe.stages) - 1) / "kdistill.json").read_text())
    data = meta["config"]["data"]["train"]  # as it ran: `stage:NAME` already resolved to the kept rows
    return sum(len(load_records(spec)) for spec in (data if isinstance(data, list) else [data]))


def compare_pad(seeds: int = 3, output: str | Path = "runs/pad-compare", test_limit: int | None = None,
                overrides: list[str] | dict[str, list[str]] | None = None, console=None, progress: bool = False) -> dict:
    """Train every variant for `seeds` seeds, score each student on the test split, and write
    `{output}/pad-compare.json` and `{output}/pad-compare.md`. `overrides`: `--set`-style assignments, for every
    variant or prefixed with one (["train.lr=1e-4", "pad:stages.1.train.steps=100"]), or a dict from variant to
    its assignments."""
    from kdistill.api.synthesize import SUMMARY
    from kdistill.engine.run_dir import check_output
    from kdistill.engine.stage_refs import synthesis_dir
    from kdistill.teachers.recipe_runs import resolve_teacher

    if seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {seeds}")
    if test_limit is not None and test_limit < 1:  # 0 scored nothing; -1 silently left out the last problem
        raise ConfigError(f"test_limit must be at least 1 (or left out for all test problems), got {test_limit}")

    output = Path(output)
    check_output(output)
    routed = split_overrides(overrides or [], VARIANTS, "compare-pad")
    recipes = {name: variant_recipe(name, routed[name]) for name in VARIANTS}  # before training
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    teacher_dir = resolve_teacher("recipe:pad-teacher", console)  # trained once, before the clock matters
    results: dict = {"seeds": seeds, "test_limit": test_limit, "variants": {}, "teacher": {}}
    cache = output / "generations.sqlite"
    for name, mode in VARIANTS.items():
        recipe = recipes[name]
        runs, first_run = [], None
        for seed in range(seeds):
            run = seeded(recipe, seed, output / name / f"seed-{seed}", cache)
            student = run_seed(run, first_run, console, progress)
            first_run = first_run or Path(run.output)
            meta = json.loads((student / "kdistill.json").read_text())
            scored = score(student, mode, test_limit)
            runs.append({"seed": seed, "accuracy": scored["accuracy"], "n": scored["n"],
                         "by_verdict": scored["by_verdict"], "examples": scored["examples"][:3],
                         "train_wall_time_s": meta.get("wall_time_s"), "eval_wall_time_s": scored["eval_wall_time_s"]})
            if console is not None:
                console.print(f"{name} seed {seed}: execution accuracy {scored['accuracy']:.3f} on {scored['n']} test "
                              f"problems ({scored['by_verdict']})", highlight=False)
        synth = [synthesis_dir(first_run, s) / SUMMARY for s in recipe.stages if s.synthesize is not None]
        accuracies = [r["accuracy"] for r in runs]
        results["variants"][name] = {
            "mode": mode, "runs": runs, "mean": statistics.fmean(accuracies),
            "stdev": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "training_rows": training_rows(first_run, recipe),
            "synthesis": json.loads(synth[0].read_text()) if synth else None,
        }
    teacher = score(teacher_dir, "program", test_limit)
    results["teacher"] = {"path": str(teacher_dir), "accuracy": teacher["accuracy"], "n": teacher["n"],
                          "by_verdict": teacher["by_verdict"]}
    results["wall_time_s"] = round(time.perf_counter() - start, 1)
    return write_report(output / "pad-compare", results, render_markdown(results), console)


def write_report(stem: Path, result: dict, markdown: str, console=None) -> dict:
    """STEM.json and STEM.md side by side (the comparisons of the API recipes), and the table on the console."""
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(markdown)
    if console is not None:
        console.print(markdown, highlight=False)
    return result


def render_markdown(results: dict) -> str:
    """The comparison table and the synthesis counts, as markdown."""
    seeds = results["seeds"]
    head = "| student | training rows | " + " | ".join(f"seed {s}" for s in range(seeds)) + " | mean ± sd |"
    lines = [head, "|" + "---|" * (seeds + 3)]
    for name, v in results["variants"].items():
        cells = " | ".join(f"{r['accuracy']:.3f}" for r in v["runs"])
        lines.append(f"| {LABELS.get(name, name)} | {v['training_rows']:,} | {cells} | "
                     f"**{v['mean']:.3f}** ± {v['stdev']:.3f} |")
    teacher = results.get("teacher") or {}
    if teacher:
        lines.append(f"| the pad-teacher itself (greedy) | - | {teacher['accuracy']:.3f}" + " |" * seeds)
    n = next(iter(results["variants"].values()))["runs"][0]["n"] if results["variants"] else 0
    lines += ["", f"Execution accuracy on {n} held-out SYNTHETIC test problems (greedy decoding; a program counts "
              f"when, run in the sandbox, it prints the answer; pad-direct's answer text is compared instead)."]
    for name, v in results["variants"].items():
        s = v.get("synthesis")
        if not s:
            continue
        dropped = ", ".join(f"{k} {c:,}" for k, c in s["dropped_by_verdict"].items()) or "none"
        lines += ["", f"- `{name}` synthesis: {s['prompts']:,} prompts × {s['candidates_per_prompt']} candidates = "
                  f"{s['candidates']:,}; kept {s['kept']:,} ({s['prompts_with_a_kept_candidate']:,} prompts with at "
                  f"least one); dropped {s['dropped']:,}: {dropped}"]
    return "\n".join(lines) + "\n"
