"""`kdistill compare`: recipes against a no-teacher baseline, over seeds, on held-out test data: the
scoring and the table's teacher. Which runs are trained or reused, and how a baseline is made:
kdistill/compare_runs.py; speed and training cost: kdistill/compare_costs.py.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from kdistill.compare_costs import TeacherCosts, pipeline_cost, pipeline_wall_time, speedup
from kdistill.compare_report import check_results_file, write_results
from kdistill.compare_unseen import UNSEEN, UNSEEN_METRICS, score_unseen, unseen_metric, unseen_records
from kdistill.compare_runs import (METRICS, baseline_dir, baseline_key, baseline_of, comparable_recipes,
                                   kept_baseline, recipe_task, reuse_shared_stages, train_or_reuse, variant)
from kdistill.config import Recipe
from kdistill.errors import ConfigError, DataError, PairingError


def test_records(recipe: Recipe) -> list[dict]:
    from kdistill.data import load_records
    from kdistill.data.sources import has_splits

    last = recipe.stages[-1]
    source = last.data.eval or last.data.train
    specs = source if isinstance(source, list) else [source]
    one_split = [spec.path for spec in specs if not has_splits(spec)]
    if last.data.eval is None and one_split:  # its "test split" would be the very records the students train on
        raise ConfigError(f"{recipe.name}: compare tests on held-out records, but the recipe has no data.eval and "
                          f"{one_split[0]} has no test split of its own (a file, or a folder without train/ and "
                          f"test/ folders, is one split): give data.eval records no stage trains on")
    records = []
    for spec in specs:
        fields = {k: v for k, v in spec.model_dump(exclude_none=True).items() if k not in ("split", "limit", "sample")}
        records += load_records({**fields, "split": "test"}, "test")
    return records


GENERATED = 500  # held-out prompts a causal LM writes definitions for (greedy decoding)
PERPLEXITY_TEXTS = 1000


def score(model_dir: str, records: list[dict], task: str, trust_remote_code: bool = False) -> tuple[float, object, dict]:
    """(the task's metric, the loaded model, other metrics) of a student or teacher on test records."""
    from kdistill.models.loading import load_model

    if task not in METRICS:
        raise ConfigError(f"compare scores {', '.join(METRICS)} students; this recipe's teacher task is {task!r}")
    loaded = load_model(model_dir, task, trust_remote_code)
    if task == "causal-lm":
        from kdistill.eval.generation import definition_scores
        from kdistill.eval.metrics import perplexity

        from kdistill.data.sources import spread

        # taken evenly through the split: its records are ordered (all nouns first), and at 200 prompts
        # from the front the same recipe's ROUGE-L moved by 0.05 between seeds (docs/results.md)
        prompts = spread(records, GENERATED)
        rouge = definition_scores(loaded.model, loaded.tokenizer, prompts, limit=GENERATED)["rouge_l"]
        texts = [r["text"] for r in spread(records, PERPLEXITY_TEXTS)]
        return rouge, loaded, {"perplexity": perplexity(loaded.model, loaded.tokenizer, texts)}
    from kdistill.eval.metrics import accuracy

    config = loaded.model.config
    names = [config.id2label[i] for i in range(config.num_labels)]
    if task == "image-classification":
        from kdistill.eval.images import image_accuracy

        return image_accuracy(loaded.model, records, names), loaded, {}
    return accuracy(loaded.model, loaded.tokenizer, records, names), loaded, {}


# Bump a task's version when score() changes what it measures for it: its kept scores then count as stale.
SCORING_VERSIONS = {"causal-lm": "2"}  # 2: prompts and perplexity texts taken evenly through the split


def score_once(student_dir: Path, records: list[dict], task: str, scorer=None,
               trust_remote_code: bool = False) -> tuple[float, dict]:
    """scorer() (score, or compare_unseen.score_unseen) of a finished student, kept in STUDENT/test-scores.json:
    a compare run again (more seeds, one more recipe, after a crash) does not test the students it already
    tested on the same records. The key holds the records themselves (labels included), the weights' size and
    time stamp, the scoring version and which scorer."""
    import hashlib
    import os

    weights = sorted(student_dir.glob("*.safetensors"))
    generated = GENERATED if task == "causal-lm" else None
    digest = hashlib.sha256(json.dumps([SCORING_VERSIONS.get(task, "1"), task, generated,
                                        [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights]]
                                       + ([scorer.__name__] if scorer is not None else [])).encode())
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, default=str).encode())
    key, path = digest.hexdigest(), student_dir / "test-scores.json"
    try:
        kept = json.loads(path.read_text()) if path.exists() else {}
    except (ValueError, OSError):
        kept = {}  # unreadable: score again and write it anew
    if key not in kept:
        value, _, extra = (scorer or score)(str(student_dir), records, task, trust_remote_code)
        kept[key] = {"score": value, "extra": extra}
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(kept, indent=1))
        os.replace(partial, path)  # a crash mid-write leaves the old file, never half of one
    return kept[key]["score"], kept[key]["extra"]


def evaluation_points(recipe: Recipe) -> list[tuple[str, int]]:
    """(row suffix, stage index) to test: the final student, and for quantization-aware recipes also the
    last stage at each earlier precision (FP32, ternary, W1A8 on the way to W1A1)."""
    from kdistill.quant.model import spec_label

    last = len(recipe.stages) - 1
    if all(s.quant is None for s in recipe.stages):
        return [("", last)]
    labels = [spec_label(s.quant.model_dump()) if s.quant else "FP32" for s in recipe.stages]
    ends = [i for i in range(last) if labels[i] != labels[i + 1]]
    return [(f" [{labels[i]}]", i) for i in ends] + [(f" [{labels[last]}]", last)]


def recipe_pairs(recipes: list[Recipe], bases: list[tuple[Recipe, str]],
                 root: Path) -> list[list[tuple[str, Recipe, Path]]]:
    """Per recipe, what it trains as (label, recipe or baseline, folder): itself, and its baseline unless an
    earlier recipe has the same one (the same student, init, data and steps: trained once, shown once)."""
    seen, pairs = set(), []
    for i, recipe in enumerate(recipes):
        pairs.append([(recipe.name, recipe, root / recipe.name)])
        if bases and bases[i][1] not in seen:
            base, key = bases[i]
            seen.add(key)
            pairs[-1].append((base.name, base, baseline_dir(root, base, key)))
    return pairs


def train_recipe_teachers(recipes: list[Recipe], console=None) -> None:
    """Every `recipe:NAME` teacher not trained yet is trained first, here and in view: the baselines' keys
    need its layer count, and with --jobs two workers would each start training the same teacher."""
    from kdistill.teachers.recipe_runs import PREFIX, resolve_teacher

    refs = [s.teacher.model for r in recipes for s in r.stages if str(s.teacher.model or "").startswith(PREFIX)]
    for ref in dict.fromkeys(refs):
        resolve_teacher(ref, console)


def seed_run(r: Recipe, baseline: bool, folder: Path, seed: int, quick: bool) -> Recipe:
    run = variant(r, seed, quick and not baseline, folder / f"seed-{seed}")  # a baseline's steps are final
    return kept_baseline(run) if baseline else run


def seed_scores(label: str, runs: list[Recipe], points: list[tuple[str, int]], records: list[dict], task: str,
                unseen: list | None, finished: dict[int, list[Recipe]], console, announce,
                progress: bool = True) -> tuple[dict, dict, list]:
    """Train (or reuse) the run of each seed and score every evaluation point on the test records (and the unseen
    domain): (scores per point, other metrics per point, each seed's pipeline wall time)."""
    from kdistill.engine.stage_refs import stage_student_dir

    accs = {suffix: [] for suffix, _ in points}
    extras: dict[str, dict[str, list]] = {suffix: {} for suffix, _ in points}
    walls = []
    for seed, run in enumerate(runs):
        start = time.perf_counter()
        announce(label, seed)
        copied = reuse_shared_stages(run, finished.setdefault(seed, []))
        if copied and console is not None:
            console.print(f"{label} seed {seed}: stages {', '.join(copied)} are those of an earlier run")
        train_or_reuse(run, console, progress)
        finished[seed].append(run)
        walls.append(pipeline_wall_time(run) or time.perf_counter() - start)
        for suffix, index in points:
            student_dir = stage_student_dir(Path(run.output), run, index)
            acc, extra = score_once(student_dir, records, task, trust_remote_code=run.trusts_remote_code)
            if unseen:
                extra = {**extra, "unseen": score_once(student_dir, unseen, task, score_unseen,
                                                       run.trusts_remote_code)[0]}
            accs[suffix].append(acc)
            for key, value in extra.items():
                extras[suffix].setdefault(key, []).append(value)
            if console is not None:
                console.print(f"{label}{suffix} seed {seed}: test {METRICS[task]} {acc:.4f}" + (
                    f"; unseen domain {UNSEEN_METRICS[task]} {extra['unseen']:.4f}" if unseen else ""))
    return accs, extras, walls


def compare(names: list[str], seeds: int = 3, quick: bool = False, output: str = "runs/compare",
            results: str = "docs/results.md", console=None, baselines: bool = True, jobs: int = 1,
            progress: bool = True) -> dict:
    from kdistill.eval.metrics import count_parameters
    from kdistill.eval.report import check_report_path
    from kdistill.engine.run_dir import check_output
    from kdistill.engine.stage_refs import stage_student_dir
    from kdistill.models.loading import load_model

    if not names:
        raise ConfigError("compare needs at least one recipe name or file")
    if seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {seeds}")
    check_report_path(results, "--results", "results.md")  # before the runs, not after them
    check_results_file(Path(results))
    check_output(Path(output))
    root = Path(output) / ("quick" if quick else "full")
    rows, teacher_row = [], None
    done_baselines: dict[str, list[dict]] = {}  # baseline key -> its rows, whose baseline_of lists recipes
    finished: dict[int, list[Recipe]] = {}  # seed -> runs trained (or reused) so far
    recipes, reference = comparable_recipes(names)
    train_recipe_teachers(recipes, console)
    bases = [(base, baseline_key(base)) for base in (baseline_of(r, quick) for r in recipes)] if baselines else []
    all_pairs = recipe_pairs(recipes, bases, root)
    # the count a long comparison reports its progress against: recipes sharing a baseline train it once
    planned = seeds * sum(map(len, all_pairs))
    all_records = [test_records(recipe) for recipe in recipes]
    started, began = 0, time.perf_counter()

    def announce(label: str, seed: int) -> None:
        nonlocal started
        started += 1
        if console is not None and jobs == 1:  # the workers have reported each run already
            console.print(f"[bold][{started}/{planned}][/bold] {label} seed {seed} "
                          f"({(time.perf_counter() - began) / 60:.0f} min in)")

    if jobs > 1:  # every run trained and scored first, `jobs` at a time; the loop below then reuses them
        from kdistill.compare_parallel import Job, train_in_parallel

        train_in_parallel([Job(label, seed_run(r, r is not recipe, folder, seed, quick), records, recipe_task(recipe))
                           for recipe, pairs, records in zip(recipes, all_pairs, all_records)
                           for label, r, folder in pairs for seed in range(seeds)], jobs, console)
    for i, recipe in enumerate(recipes):
        pairs, base_name, records = all_pairs[i], f"{recipe.name}-baseline", all_records[i]
        if baselines:
            base_key = bases[i][1]
            if base_key in done_baselines:
                for row in done_baselines[base_key]:
                    row["baseline_of"].append(recipe.name)
            else:
                done_baselines[base_key] = []
        task = recipe_task(recipe)
        if teacher_row is None:
            reference_records = all_records[recipes.index(reference)]
            teacher_row, teacher = reference_teacher(reference, reference_records, task, console)
            costs = TeacherCosts(records, console)
            reference_cost = costs.of(teacher.model, teacher.tokenizer, recipe.stages[-1].data.max_length)
            # a teacher that learns the task in the loop has no predictions to agree with before the run
            unseen = unseen_records(task, teacher) if teacher_row.get("score") else None
            if unseen and task == "causal-lm":
                teacher_row["unseen"] = [unseen_metric(teacher, unseen, task)]
        for label, r, folder in pairs:
            points = evaluation_points(r)
            runs = [seed_run(r, r is not recipe, folder, seed, quick) for seed in range(seeds)]
            accs, extras, walls = seed_scores(label, runs, points, records, task, unseen, finished, console, announce,
                                              progress)
            run = runs[-1]
            for suffix, index in points:
                model = load_model(str(stage_student_dir(Path(run.output), run, index)), task,  # the last seed's
                                   run.trusts_remote_code)
                row = {"name": label + suffix, "baseline_of": [recipe.name] if label == base_name else None,
                       "score": accs[suffix], "params": count_parameters(model.model),
                       "speedup": speedup(teacher, model, records, task), **extras[suffix]}
                if suffix == points[-1][0]:  # training cost belongs to the whole pipeline
                    row.update(pipeline_cost(run, model, walls, teacher.tokenizer, records,
                                             lambda stage: costs.for_stage(stage, model, reference_cost)))
                rows.append(row)
                if row["baseline_of"] is not None:
                    done_baselines[base_key].append(row)
    report = {"quick": quick, "seeds": seeds, "test_records": len(records), "metric": METRICS[task],
              "unseen": {"corpus": UNSEEN, "texts": len(unseen), "metric": UNSEEN_METRICS[task]} if unseen else None,
              "teacher": teacher_row, "rows": rows,
              "created": time.strftime("%Y-%m-%d %H:%M")}
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(report, indent=2))
    write_results(report, Path(results), names)
    return report


def reference_teacher(recipe: Recipe, records: list[dict], task: str, console=None) -> tuple[dict, object]:
    """The table's teacher row and model. A teacher that learns the task in the loop from a base model
    (ProKT from a pretrained encoder) has no trained head before the run: it is listed, not scored."""
    from kdistill.eval.metrics import count_parameters
    from kdistill.models.blueprints import is_blueprint
    from kdistill.models.loading import load_model
    from kdistill.teachers.recipe_runs import resolve_teacher

    spec = recipe.stages[-1].teacher
    ref = resolve_teacher(spec.model, console)
    row = {"name": "teacher", "ref": spec.model}
    # a blueprint's head is drawn anew in every run: nothing fixed to score
    unscored = "a random init (blueprint): not scored" if is_blueprint(spec.model) else None
    if unscored is None:
        try:
            value, teacher, extra = score(ref, records, task, spec.trust_remote_code)
            row.update(score=[value], **{k: [v] for k, v in extra.items()})
        except (DataError, PairingError):
            if spec.update is None:
                raise
            unscored = "learns the task in the loop: not scored"
    if unscored is not None:
        teacher = load_model(ref, task, spec.trust_remote_code)
        row.update(score=None, note=unscored)
    row["params"] = count_parameters(teacher.model)
    return row, teacher
