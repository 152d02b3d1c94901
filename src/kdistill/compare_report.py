"""`kdistill compare`'s report: the results table (markdown), its bar chart, and the section of
docs/results.md each comparison owns."""
from __future__ import annotations

import statistics
from pathlib import Path

from kdistill.errors import ConfigError


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def spread(values: list[float], digits: int) -> str:
    """'mean ± std' over seeds; one seed has no spread to show (a '± 0' would claim one)."""
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def markdown(report: dict) -> str:
    teacher, metric = report["teacher"], report["metric"]
    t_acc = teacher["score"][0] if teacher.get("score") else None  # None: a teacher that learns in the loop
    t_cells = f"{t_acc:.4f} | 100%" if t_acc is not None else f"— ({teacher['note']}) | —"
    flops = any("train_pflops" in r for r in report["rows"])
    packed = any("packed" in r for r in report["rows"])
    ppl = "perplexity" in teacher
    mixed = len({len(r["score"]) for r in report["rows"]}) > 1  # rows merged from runs with other seed counts
    head = ["model", f"test {metric}" + (" (seeds)" if mixed else ""), "% of teacher", "parameters", "speed-up",
            "steps", "train wall time (s)"]
    head += ["est. train PFLOP"] * flops + ["packed 1-bit weights (vs FP32)"] * packed + ["perplexity"] * ppl
    unseen = report.get("unseen")
    if unseen:  # the metric's digits: perplexities in the tens, agreements as shares
        digits = 2 if unseen["metric"] == "perplexity" else 4
        head.append(f"unseen domain: {unseen['metric']}")
        t_unseen = f" {teacher['unseen'][0]:.{digits}f} |" if teacher.get("unseen") else " — |"
    from kdistill.compare import GENERATED

    scope = f" ({GENERATED} generated definitions, taken evenly through the split)" if metric == "ROUGE-L" else ""
    seeds = "seeds per row in brackets" if mixed else f"{report['seeds']} seed(s)"
    lines = [f"Test {metric}{scope} on {report['test_records']} held-out records, {seeds}"
             f"{' (--quick: 1/8 of the steps)' if report['quick'] else ''}; measured {report['created']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             f"| teacher ({teacher['ref']}) | {t_cells} | {teacher['params']:,} | 1.00× |"
             + " |" * (len(head) - 5 - ppl - bool(unseen)) + (f" {teacher['perplexity'][0]:.2f} |" if ppl else "")
             + (t_unseen if unseen else "")]
    for row in report["rows"]:
        m = statistics.mean(row["score"])
        shared = (row.get("baseline_of") or [])[1:]
        name = row["name"] + (f" (also the baseline of {', '.join(shared)})" if shared else "")
        cells = [name, spread(row["score"], 4) + (f" ({len(row['score'])})" if mixed else ""),
                 f"{m / t_acc:.1%}" if t_acc else "—", f"{row['params']:,}",
                 f"{row['speedup']:.2f}×" if row["speedup"] else "—", str(row.get("steps", "")),
                 f"{statistics.mean(row['wall_time_s']):.0f}" if row.get("wall_time_s") else ""]
        if flops:
            cells.append(f"{row['train_pflops']:.3g}" if "train_pflops" in row else "")
        if packed:
            p = row.get("packed")
            cells.append(f"{p['quantized_linear_packed_bytes'] / 2**20:.2f} MiB "
                         f"(1/{1 / p['quantized_linear_ratio']:.1f})" if p else "")
        if ppl:
            cells.append(spread(row["perplexity"], 2))
        if unseen:
            cells.append(spread(row["unseen"], digits) if row.get("unseen") else "")
        lines.append("| " + " | ".join(cells) + " |")
    if unseen:
        lines += ["", f"Unseen domain: {unseen['texts']} paragraphs of the `{unseen['corpus']}` corpus (legal English "
                      f"no recipe trains on); {UNSEEN_NOTES[unseen['metric']]}."]
    return "\n".join(lines)


UNSEEN_NOTES = {
    "perplexity": "the students' perplexity there, lower is better",
    "agreement with the teacher": "the share of them where the student predicts the teacher's class (no labels "
                                  "exist there: fidelity to the teacher is what can be measured)"}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = report["teacher"]
    rows = ([{"name": "teacher", "score": teacher["score"], "speedup": 1.0}] if teacher.get("score") else [])
    rows += report["rows"]
    names = [r["name"] for r in rows]
    colors = ["#555" if r["name"] == "teacher" else "#bbb" if r.get("baseline_of") else "#3a7" for r in rows]
    means = [mean_std(r["score"]) for r in rows]
    # the table's columns a reader compares at a glance: the metric (with % of the teacher), speed-up, wall time
    fig, (ax, speed, wall) = plt.subplots(3, 1, sharex=True, figsize=(1.4 * len(rows) + 2, 8),
                                          gridspec_kw={"height_ratios": [2, 1, 1]})
    bars = ax.bar(names, [m for m, _ in means], yerr=[s for _, s in means], capsize=4, color=colors)
    low = min(m for m, _ in means)
    ax.set(ylabel=f"test {report['metric']}", ylim=(max(0, low - 0.05), min(1, max(m for m, _ in means) + 0.03)))
    if teacher.get("score") and teacher["score"][0]:  # a teacher scoring 0 (a tiny random one) gives no percentage
        t = teacher["score"][0]
        ax.bar_label(bars, labels=[f"{m / t:.0%}" for m, _ in means], fontsize=8, padding=2)
    speed.bar(names, [r.get("speedup") or 0 for r in rows], color=colors)
    speed.set(ylabel="speed-up (×)")
    wall.bar(names, [statistics.mean(r["wall_time_s"]) if r.get("wall_time_s") else 0 for r in rows], color=colors)
    wall.set(ylabel="train wall time (s)")
    plt.setp(wall.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check_results_file(path: Path) -> None:
    """The results file is markdown the comparison adds its section to: anything else (a mistyped path to a model
    or the data) would be appended to, or fail only after hours of runs."""
    if path.suffix.lower() not in (".md", ".markdown"):
        raise ConfigError(f"--results {path}: the comparison writes a markdown section; give a .md file, "
                          f"e.g. {path.with_suffix('.md')}")
    if path.is_file():
        try:
            path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as err:
            raise ConfigError(f"--results {path} exists and is not readable text ({type(err).__name__}); "
                              f"give another file") from None


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
