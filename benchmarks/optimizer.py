"""AdamW on CPU: torch's default per-tensor loop vs its foreach and fused kernels, on the parameters of
real kdistill students (built from their recipes, random weights: the update cost does not depend on
the values). The engine uses the fused kernel (kdistill.engine.schedule.make_adamw).

    python benchmarks/optimizer.py [--recipes supersense-kd tinybert lm-kd] [--repeats 10]

Prints a table and writes benchmarks/results/optimizer.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

IMPLEMENTATIONS = {"loop (torch default on CPU)": {"foreach": False}, "foreach": {"foreach": True},
                   "fused (kdistill)": {"fused": True}}


def student_parameters(recipe_name: str) -> list[torch.nn.Parameter]:
    from kdistill.config import load_recipe
    from kdistill.engine.build import build_stage

    recipe = load_recipe(recipe_name)
    stage = next(s for s in reversed(recipe.stages) if s.student is not None)
    parts = build_stage(stage, None, "", None)
    return [p for p in parts.student.parameters() if p.requires_grad]


def seconds_per_step(params: list[torch.nn.Parameter], options: dict, repeats: int) -> float:
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p in copies:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(copies, lr=1e-4, weight_decay=0.01, **options)
    optimizer.step()  # warm-up: the state is allocated here
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["supersense-kd", "tinybert", "lm-kd"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    rows = []
    for name in args.recipes:
        params = student_parameters(name)
        row = {"recipe": name, "parameters": sum(p.numel() for p in params), "tensors": len(params)}
        row["ms"] = {impl: 1000 * seconds_per_step(params, options, args.repeats)
                     for impl, options in IMPLEMENTATIONS.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = Table(title=f"one AdamW step on CPU ({torch.get_num_threads()} threads), best of {args.repeats}")
    for col in ("student of", "parameters", *IMPLEMENTATIONS, "fused vs loop"):
        table.add_column(col, justify="right")
    for row in rows:
        ms = row["ms"]
        table.add_row(row["recipe"], f"{row['parameters']:,}", *(f"{ms[i]:.1f} ms" for i in IMPLEMENTATIONS),
                      f"{ms['loop (torch default on CPU)'] / ms['fused (kdistill)']:.1f}× faster")
    Console().print(table)
    out = Path(__file__).parent / "results" / "optimizer.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "threads": torch.get_num_threads(),
                               "torch": torch.__version__, "created": time.strftime("%Y-%m-%d %H:%M"),
                               "load_avg_1min": round(__import__("os").getloadavg()[0], 2), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
