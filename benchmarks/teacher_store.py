"""The teacher store: student quality from top-k = 8/32/64 vs the live teacher, bytes per position vs
full logits, and the cost of a training step from the store vs plain SFT and vs the live teacher.

All runs use one recipe (default `lm-kd`) and the same seed; the store is built once per k with
`kdistill cache-teacher` and training reads it instead of running the teacher.

    python benchmarks/teacher_store.py [--recipe lm-kd] [--k 8 32 64] [--steps 400] [--train-limit 16000] [--seed N]
                                       [--no-next-token] [--sample 64] [--sample-head 32]

The stores keep each position's next token beside the top k, as `kdistill cache-teacher` does for a
causal LM; `--no-next-token` measures plain top-k stores. `--sample N` adds a store of N tokens drawn
from the teacher per position (a second teacher pass); with `--sample-head H` those stores also keep the
teacher's H most likely tokens exactly and draw from the rest (`--sample 32 --sample-head 32`: 64 columns).

The teacher runs once, for the largest k; the smaller stores are cut from that one (`narrow_store`: the same
store as a pass at that k). `--train-limit N` keeps the first N records of each training source for every run (and so for every store):
the store is built over the data the runs read, and a 400-step run reads 12,800 texts.

Prints a table and writes its run into benchmarks/results/teacher_store.json (one run per device, teacher, recipe,
settings, k and store kind; a run with the same ones is replaced).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kdistill.compare import score, test_records
from kdistill.compare_runs import recipe_task
from kdistill.config import load_recipe
from kdistill.engine.run import run_recipe
from kdistill.teachers.store import VERSION, narrow_store, storage_report
from kdistill.teachers.store_build import cache_teacher


def train(raw_recipe, overrides: list[str], output: Path) -> tuple[Path, float]:
    import shutil

    shutil.rmtree(output, ignore_errors=True)  # this benchmark's own run from before: a rerun replaces it
    recipe = load_recipe(raw_recipe, overrides, output=str(output))
    run_recipe(recipe, force=True, progress=False)
    meta = json.loads((output / "student" / "kdistill.json").read_text())
    return output / "student", meta["wall_time_s"] / meta["steps"]


def teacher_weights_id(ref: str, task: str) -> str:
    """What names the teacher in the results: the fingerprint a store's manifest gives it (of the loaded model's
    ``state_dict()``, tied weights included), so a run against a retrained teacher is a new run, not a replacement,
    and the id can be matched with the stores' manifests. (Runs created before 2026-11-26 13:52 hold the
    fingerprint of the weight file's tensors instead: 8442eb87… is the same default lm-teacher as 54c44660….)"""
    from kdistill.models.loading import load_model
    from kdistill.teachers.fingerprint import fingerprint_tensors
    from kdistill.teachers.recipe_runs import resolve_teacher

    return fingerprint_tensors(load_model(resolve_teacher(ref), task).model.state_dict())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="lm-kd")
    parser.add_argument("--k", type=int, nargs="*", default=[8, 32, 64], help="top-k stores (none: `--k` alone)")
    parser.add_argument("--seed", type=int, default=None, help="train.seed of every run (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--train-limit", type=int, default=16000, help="first N records of each training source")
    parser.add_argument("--output", default="runs/bench-store")
    parser.add_argument("--next-token", action=argparse.BooleanOptionalAction, default=True,
                        help="keep each position's next token in the store (default, as cache-teacher does)")
    parser.add_argument("--sample", type=int, nargs="*", default=[], help="also stores of N sampled tokens")
    parser.add_argument("--sample-head", type=int, default=0, help="the sampled stores keep the top H exactly too")
    args = parser.parse_args()
    if args.sample_head and not args.sample or args.sample_head < 0:
        parser.error("--sample-head H (>= 0) keeps the top H beside the draws of --sample N: add --sample")

    from rich.console import Console
    from rich.table import Table

    root = Path(args.output)
    steps = [f"train.steps={args.steps}", "train.eval_every=null"] + [f"train.seed={args.seed}"] * (args.seed is not None)
    recipe = load_recipe(args.recipe, steps)
    records, task = test_records(recipe), recipe_task(recipe)
    teacher_id = teacher_weights_id(recipe.stages[0].teacher.model, recipe.stages[0].teacher.task)
    rows = []

    def measure(name: str, student: Path, seconds_per_step: float, extra: dict | None = None):
        value, _, more = score(str(student), records, task)
        rows.append({"name": name, "score": value, **more, "s_per_step": seconds_per_step, **(extra or {})})
        print(json.dumps(rows[-1]), flush=True)

    def variant(**stage_fields) -> dict:
        # every run starts from the same random 2-layer student: a store holds no teacher weights to copy
        raw = load_recipe(args.recipe, steps).dump()
        train = raw["stages"][0]["data"]["train"]
        train = [{**spec, "limit": args.train_limit} for spec in (train if isinstance(train, list) else [train])]
        raw["stages"][0]["data"]["train"] = train
        raw["stages"][0].update(student={"config": {"n_layer": 2}}, **stage_fields)
        return raw

    def from_store(name: str, store: Path, build_seconds: float, output: Path, teacher_pass: bool):
        report = storage_report(store)
        cached = variant(teacher={"source": "cache", "path": str(store), "task": task})
        measure(name, *train(cached, [], output),
                {"bytes_per_position": report.bytes_per_position, "dense_bytes_per_position":
                 report.dense_bytes_per_position, "store_build_seconds": build_seconds, "teacher_pass": teacher_pass})

    measure("sft (no teacher)", *train(variant(losses=[{"type": "cross_entropy"}]), [], root / "sft"))
    measure("live teacher", *train(variant(), [], root / "live"))
    widest = max(args.k, default=0)
    for k in sorted(args.k, reverse=True):  # one teacher pass, at the largest k; the others are cut from it
        start = time.perf_counter()
        store = (cache_teacher(load_recipe(variant()), k=k, out=str(root / f"store-k{k}"), next_token=args.next_token)
                 if k == widest else
                 narrow_store(root / f"store-k{widest}", root / f"store-k{k}", k))
        from_store(f"store k={k}", store, time.perf_counter() - start, root / f"from-store-k{k}", k == widest)
    for draws in args.sample:
        start = time.perf_counter()
        name = f"top {args.sample_head} + {draws} sampled" if args.sample_head else f"sampled {draws}"
        tag = f"{draws}h{args.sample_head}" if args.sample_head else f"{draws}"
        store = cache_teacher(load_recipe(variant()), sample=draws, out=str(root / f"store-sampled{tag}"),
                              sample_head=args.sample_head)
        from_store(name, store, time.perf_counter() - start, root / f"from-sampled{tag}", True)

    kind = ("top-k + next token" if args.next_token else "top-k") + (" and sampled" if args.sample else "")
    table = Table(title=f"{args.recipe}: {args.steps} steps, {kind} stores, test {task} metric on {len(records)} records")
    for col in ("run", "score", "perplexity", "s/step", "store bytes/position (vs full logits)"):
        table.add_column(col, justify="right")
    for r in rows:
        size = (f"{r['bytes_per_position']:.0f} ({r['bytes_per_position'] / r['dense_bytes_per_position']:.2%})"
                if "bytes_per_position" in r else "")
        table.add_row(r["name"], f"{r['score']:.4f}", f"{r.get('perplexity', float('nan')):.2f}",
                      f"{r['s_per_step']:.3f}", size)
    Console().print(table)
    import os
    import platform

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    run = {"recipe": args.recipe, "teacher": teacher_id, "steps": args.steps, "train_limit": args.train_limit,
           "next_token": args.next_token, "sample": args.sample, "sample_head": args.sample_head, "seed": args.seed,
           "k": args.k, "store_format": VERSION, "device": device, "cpus": os.cpu_count(),
           "torch": torch.__version__, "rows": rows, "created": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(__file__).parent / "results" / "teacher_store.json"
    out.parent.mkdir(exist_ok=True)
    same = ("recipe", "teacher", "steps", "train_limit", "next_token", "sample", "sample_head", "seed", "device", "k")
    runs = json.loads(out.read_text()).get("runs", []) if out.exists() else []
    runs = [r for r in runs if any(r.get(key) != run[key] for key in same)] + [run]
    out.write_text(json.dumps({"runs": runs}, indent=2))


if __name__ == "__main__":
    main()
