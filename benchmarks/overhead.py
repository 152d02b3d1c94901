"""Engine overhead: kdistill's training step vs a hand-written PyTorch loop doing the same KD step.

Both run in this one process on the same teacher, the same student initialisation, the same batches
(tokenised every step in both) and the same loss (embedding cosine, the demo recipe's),
with AdamW, warm-up/decay and clipping. Steps are interleaved (engine, hand, engine, hand, ...) so
load from anything else on the machine hits both alike. Also reports achieved FLOP/s (counted with
torch's FlopCounterMode) against this machine's measured fp32 matmul rate.

    python benchmarks/overhead.py [--steps 16] [--batch-size 32] [--max-length 128]

Prints a table and writes benchmarks/results/overhead.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from kdistill.config import load_recipe
from kdistill.engine.build import build_stage
from kdistill.engine.loop import StageTrainer
from kdistill.engine.params import param_groups
from kdistill.engine.run import make_accelerator
from kdistill.engine.schedule import make_adamw, make_scheduler
from kdistill.models.student import build_student


def matmul_rate(size: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class HandLoop:
    """What a user would write by hand for the same distillation step."""

    def __init__(self, teacher, student, tokenizer, records, cfg, max_length):
        self.teacher, self.student, self.tok = teacher, student, tokenizer
        self.records, self.cfg, self.max_length = records, cfg, max_length
        # the engine's optimizer (fused AdamW), so the ratio is the engine's own overhead; what fusing
        # gains over torch's default AdamW is benchmarks/optimizer.py's
        self.opt = make_adamw(param_groups(student, cfg.weight_decay, cfg.lr), cfg.lr)
        self.sched = make_scheduler(self.opt, cfg.steps, cfg.warmup, cfg.schedule)

    @staticmethod
    def mean_pool(hidden, mask):
        m = mask.unsqueeze(-1).float()
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)

    def step(self, indices):
        texts = [self.records[i]["text"] for i in indices]
        batch = self.tok(texts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.no_grad():
            t = self.teacher(**batch).last_hidden_state
        self.student.train()
        s = self.student(**batch).last_hidden_state
        mask = batch["attention_mask"]
        loss = 1 - F.cosine_similarity(self.mean_pool(s, mask), self.mean_pool(t, mask), dim=-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16, help="timed steps per loop")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "overhead.json"))
    args = ap.parse_args()
    console = Console()

    total = args.steps + args.warmup
    recipe = load_recipe("minilm-l3", [f"train.steps={total}", f"train.batch_size={args.batch_size}",
                                       f"data.max_length={args.max_length}", "train.eval_every=null",
                                       "train.save_every=null", "data.eval=null"], output="/tmp/kdistill-bench")
    stage = recipe.stages[0]
    parts = build_stage(stage)
    accelerator = make_accelerator()
    trainer = StageTrainer(parts, stage, Path("/tmp/kdistill-bench"), accelerator, progress=False)
    trainer.logger.enabled = False
    hand_student = build_student(stage.student, parts.teacher, parts.teacher_info.task, stage.train.seed)
    hand = HandLoop(parts.teacher, hand_student, parts.tokenizer, parts.train_records, stage.train, args.max_length)

    engine_times, hand_times = [], []
    for step in range(total):
        indices = trainer.plan.global_indices(step)
        start = time.perf_counter()
        trainer.train_step(step)
        mid = time.perf_counter()
        hand.step(indices)
        end = time.perf_counter()
        if step >= args.warmup:
            engine_times.append(mid - start)
            hand_times.append(end - mid)

    # Batches differ in length (and so in work): count the FLOPs of each timed batch, after timing.
    flops_each = []
    for step in range(args.warmup, total):
        with FlopCounterMode(display=False) as counter:
            hand.step(trainer.plan.global_indices(step))
        flops_each.append(counter.get_total_flops())
    flops = statistics.mean(flops_each)
    rate = matmul_rate()
    engine_s, hand_s = statistics.mean(engine_times), statistics.mean(hand_times)
    result = {
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "setting": {"recipe": "minilm-l3", "teacher": stage.teacher.model,
                    "student": stage.student.model_dump(exclude_none=True), "batch_size": args.batch_size,
                    "max_length": args.max_length, "timed_steps": args.steps},
        "engine_step_s": engine_s, "hand_step_s": hand_s, "ratio": engine_s / hand_s,
        "engine_step_median_s": statistics.median(engine_times), "hand_step_median_s": statistics.median(hand_times),
        "flops_per_step": flops, "engine_flops_per_s": flops / engine_s, "matmul_flops_per_s": rate,
        "engine_fraction_of_matmul_peak": flops / engine_s / rate,
        "engine_times": engine_times, "hand_times": hand_times,
    }
    table = Table(title="kdistill engine overhead (mean step over the same batches, interleaved)")
    for col in ("", "kdistill engine", "hand-written loop"):
        table.add_column(col, justify="right")
    table.add_row("step time (s)", f"{engine_s:.3f}", f"{hand_s:.3f}")
    table.add_row("ratio engine / hand", f"{result['ratio']:.3f}×", "1.000×")
    table.add_row("GFLOP per step", f"{flops / 1e9:.1f}", f"{flops / 1e9:.1f}")
    table.add_row("achieved GFLOP/s", f"{flops / engine_s / 1e9:.1f}", f"{flops / hand_s / 1e9:.1f}")
    table.add_row("fp32 matmul GFLOP/s (measured)", f"{rate / 1e9:.1f}", f"{rate / 1e9:.1f}")
    table.add_row("fraction of matmul rate", f"{result['engine_fraction_of_matmul_peak']:.0%}", f"{flops / hand_s / rate:.0%}")
    console.print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
