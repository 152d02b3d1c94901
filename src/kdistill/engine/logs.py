"""Per-term training logs: console lines, a JSONL file, TensorBoard, and a PNG of the loss curves."""
from __future__ import annotations

import json
import time
from pathlib import Path


class RunLogger:
    def __init__(self, run_dir: Path, stage: str, enabled: bool = True, console=None):
        self.enabled = enabled
        self.stage = stage
        self.console = console
        self.jsonl = run_dir / "logs" / f"{stage}.jsonl"
        self.tb_dir = run_dir / "tensorboard" / stage
        self.tb = None
        self.purge_from: int | None = None  # set on resuming: TensorBoard drops that step and later ones
        if enabled:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)

    def tensorboard(self):
        """The writer, opened at the first record, so a resumed run can open it with purge_step."""
        if self.tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                self.tb = False
            else:
                self.tb = SummaryWriter(str(self.tb_dir), purge_step=self.purge_from)
        return self.tb or None

    def log(self, step: int, values: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"stage": self.stage, "kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        if (tb := self.tensorboard()) is not None:
            for key, value in flatten(values).items():
                if isinstance(value, (int, float)):
                    tb.add_scalar(f"{kind}/{key}", value, step)
        if self.console is not None and kind == "eval":  # train parts live in the progress bar
            parts = "  ".join(f"{k} {v:.4g}" for k, v in flatten(values).items() if isinstance(v, float))
            self.console.print(f"[dim]{self.stage}[/] {kind} step {step}: {parts}")

    def forget_after(self, step: int) -> None:
        """On resuming at ``step``: drop the rows logged past it before the run stopped. Those steps run again, and
        kept twice they would make the loss curves double back. A line cut short by the stop goes too."""
        self.purge_from = step + 1
        if not self.enabled or not self.jsonl.exists():
            return
        lines = self.jsonl.read_text(errors="replace").splitlines()  # a damaged line is dropped, not fatal
        kept = [line for line in lines if (row := parse(line)) is not None and row.get("step", 0) <= step]
        if len(kept) != len(lines):
            self.jsonl.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.tb:
            self.tb.close()


def parse(line: str) -> dict | None:
    """A log row, or None for a blank line or one cut short (a process killed mid-write, a full disk)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_logs(run_dir: Path) -> list[dict]:
    records = []
    for path in sorted((run_dir / "logs").glob("*.jsonl")):
        records += [row for line in path.read_text().splitlines() if (row := parse(line)) is not None]
    return records


def plot_losses(run_dir: Path) -> Path | None:
    """loss_curves.png: total and per-term training loss, eval loss as markers, one panel per stage."""
    records = read_logs(run_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(r["stage"] for r in records))
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        train = [r for r in records if r["stage"] == stage and r["kind"] == "train"]
        evals = [r for r in records if r["stage"] == stage and r["kind"] == "eval" and "loss" in r]
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["loss"] for r in train], label="loss", linewidth=2)
        # every term any row has: a forced resume may have changed the terms part-way (absent: a gap)
        for name in dict.fromkeys(name for r in train for name in r.get("parts", {})):
            ax.plot(steps, [r.get("parts", {}).get(name, float("nan")) for r in train], label=name, alpha=0.7)
        if evals:
            ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o--", label="eval loss")
        ax.set(title=stage, xlabel="step", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = run_dir / "loss_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
