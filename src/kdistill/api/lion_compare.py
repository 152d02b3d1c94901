"""Lion against plain imitation, measured: the student's held-out ROUGE-L after every round of `lion` (new
instructions next to the hard ones) and of `lion-random` (the same rounds, training and teacher calls on random
new instructions), per seed, with the teacher's own score on the same prompts for scale.

    from kdistill.api.lion_compare import compare_lion
    compare_lion(seeds=1, output="runs/lion-compare")   # writes lion-compare.md and lion-compare.json there

A seed sets both the seed pool (`lion.seed`) and the training seed, and the two variants of a seed share
it, so they differ only in which new instructions the rounds add. Both share one teacher-answer cache:
round 1 (the same seed pool) is answered once.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from kdistill.api.lion import SUMMARY
from kdistill.api.variants import split_overrides, variant_with_overrides
from kdistill.config import Recipe
from kdistill.engine.stage_refs import synthesis_dir

VARIANTS = {"lion": "lion: new instructions next to hard ones (and easy ones)",
            "lion-random": "plain imitation: random new instructions"}


def variant_recipe(name: str, seed: int, output: Path, cache: Path, overrides=()) -> Recipe:
    """The variant with the user's overrides (named as theirs in a refusal), then this seed and the shared cache."""
    recipe = variant_with_overrides(name, list(overrides), "compare-lion",
                                    ("output", "train.seed", "lion.seed", "lion.cache"), "output, seed and answer cache",
                                    output=str(output / f"{name}-seed{seed}"))
    stage = recipe.stages[0]
    lion = stage.lion.model_copy(update={"cache": str(cache), "seed": seed})
    train = stage.train.model_copy(update={"seed": seed})
    stage = stage.model_copy(update={"lion": lion, "train": train})
    return Recipe(name=recipe.name, output=recipe.output, stages=[stage])


def teacher_score(recipe: Recipe) -> float:
    """The teacher's own ROUGE-L on the eval prompts the students are scored on (a local teacher)."""
    from kdistill.api.lion_eval import held_out_records
    from kdistill.eval.generation import definition_scores
    from kdistill.models.loading import load_model
    from kdistill.teachers.recipe_runs import resolve_teacher

    stage = recipe.stages[0]
    records = held_out_records(stage.lion)
    loaded = load_model(resolve_teacher(stage.teacher.model), "causal-lm", stage.teacher.trust_remote_code)
    return definition_scores(loaded.model.eval(), loaded.tokenizer, records, limit=len(records),
                             max_new_tokens=stage.lion.answers.max_new_tokens)["rouge_l"]


def compare_lion(seeds: int = 1, output: str | Path = "runs/lion-compare", overrides=(), console=None,
                 progress: bool = True) -> dict:
    from kdistill.engine.export import is_complete
    from kdistill.engine.run import run_recipe
    from kdistill.engine.run_dir import check_output
    from kdistill.errors import ConfigError

    if seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {seeds}")

    output = Path(output)
    check_output(output)
    routed = split_overrides(overrides or [], VARIANTS, "compare-lion")
    cache = output / "teacher.sqlite"
    for name in VARIANTS:  # every variant's overrides checked before anything trains
        variant_recipe(name, 0, output, cache, routed[name])
    output.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for seed in range(seeds):
        for name in VARIANTS:
            recipe = variant_recipe(name, seed, output, cache, routed[name])
            out = Path(recipe.output)
            if not is_complete(out / "student"):  # a finished variant (an earlier call) is read, not run again
                run_recipe(recipe, resume=(out / "config.resolved.yaml").exists(), console=console, progress=progress)
            summary = json.loads((synthesis_dir(out, recipe.stages[0]) / SUMMARY).read_text())
            runs[name].append({"seed": seed, "wall_time_s": round(sum(r["wall_time_s"] for r in summary["rounds"]), 1),
                               "rouge_l": [summary["eval_before"]] + [r["eval_rouge_l"] for r in summary["rounds"]],
                               "teacher_answers": [0] + [r["teacher_answers_total"] for r in summary["rounds"]],
                               "hard_fraction": [hard_fraction(r) for r in summary["rounds"]]})
    recipe = variant_recipe("lion", 0, output, cache, routed["lion"])
    result = {"variants": VARIANTS, "seeds": seeds, "overrides": routed, "runs": runs,
              "teacher_rouge_l": teacher_score(recipe), "eval_prompts": recipe.stages[0].lion.eval_limit,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    from kdistill.api.pad import write_report

    return write_report(output / "lion-compare", result, table(result), console)


def hard_fraction(round_summary: dict) -> float | None:
    """The share of hard ones among the pairs the referee did judge: a failed judgement is neither."""
    judged = round_summary["hard"] + round_summary["easy"]
    return round_summary["hard"] / judged if judged else None


def table(result: dict) -> str:
    """Rounds down, variants across: mean ROUGE-L over seeds (± sample std with several), teacher calls."""
    names = list(result["runs"])
    rounds = len(result["runs"][names[0]][0]["rouge_l"])

    def cell(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        mean = statistics.mean(values)
        return f"{mean:.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")

    lines = [f"| after round | teacher answers so far | {' | '.join(names)} |", "|---|---|" + "---|" * len(names)]
    for r in range(rounds):
        calls = result["runs"][names[0]][0]["teacher_answers"][r]
        label = "0 (the student before imitation)" if r == 0 else str(r)
        lines.append(f"| {label} | {calls} | " + " | ".join(cell([run["rouge_l"][r] for run in result["runs"][n]])
                                                             for n in names) + " |")
    hard = " · ".join(f"{n}: " + ", ".join(cell([run["hard_fraction"][r] for run in result["runs"][n]])
                                           for r in range(rounds - 2)) for n in names)
    return ("\n".join(lines) + f"\n\nHeld-out ROUGE-L of greedy definitions, {result['eval_prompts']} dev prompts, "
            f"{result['seeds']} seed(s); the teacher scores {result['teacher_rouge_l']:.4f} on the same prompts. "
            f"Fraction of the pool the referee marked hard after rounds 1..{rounds - 2}: {hard}.\n")
