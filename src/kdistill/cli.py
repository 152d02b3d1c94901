"""The `kdistill` command. Heavy libraries are imported inside commands, so `--help` answers at once."""
from __future__ import annotations

import functools
import inspect
import os
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Knowledge distillation for transformer models, from one recipe.")
console = Console(emoji=False)  # a ":smile:" in a name or path the user gave is printed as written
err_console = Console(stderr=True, emoji=False)


RESUME_HINT = "interrupted; continue with the same command plus --resume"
COMPARE_HINT = ("interrupted; run the same command again: finished runs are reused and the interrupted ones continue "
                "from their last checkpoints")


PYTHON_SHOWWARNING = warnings.showwarning
PACKAGE = Path(__file__).resolve().parent


def show_warning(message, category, filename, lineno, file=None, line=None):
    """kdistill's own warnings as one plain line each, as its errors are; other libraries' as Python shows them."""
    if Path(filename).resolve().is_relative_to(PACKAGE):
        err_console.print("[yellow]warning:[/] ", end="")
        err_console.print(str(message), highlight=False, markup=False, soft_wrap=True)
    else:
        PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


def friendly(fn=None, *, interrupted: str | None = None):
    """Known errors become one clear message and exit code 2; a traceback means a bug in kdistill.

    Ctrl-C says how to go on: `interrupted` where given, the --resume flag where the command has one."""
    if fn is None:
        return functools.partial(friendly, interrupted=interrupted)
    if interrupted is None:
        interrupted = RESUME_HINT if "resume" in inspect.signature(fn).parameters else "interrupted"

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from kdistill.errors import ConfigError, KdistillError, PairingError

        try:
            with warnings.catch_warnings():
                warnings.showwarning = show_warning
                return fn(*args, **kwargs)
        except KdistillError as err:
            if os.environ.get("RANK", "0") != "0" and isinstance(err, (ConfigError, PairingError)):
                raise typer.Exit(2) from None  # the same recipe and models in every process: the first one says why
            err_console.print("[bold red]error:[/] ", end="")
            err_console.print(str(err), highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except FloatingPointError as err:
            err_console.print(f"error: {err}", highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print(interrupted)
            raise typer.Exit(130) from None

    return wrapper


SetOpt = typer.Option(None, "--set", help="override a recipe field: a.b.c=value (repeatable)")


@app.command()
@friendly
def run(recipe: str = typer.Argument(..., help="recipe YAML file or built-in recipe name"),
        set_: Optional[List[str]] = SetOpt,
        output: Optional[str] = typer.Option(None, help="run directory (default: the recipe's output)"),
        resume: bool = typer.Option(False, help="continue the run in the output directory from its last checkpoint"),
        force: bool = typer.Option(False, help="with --resume: resume even if the recipe changed"),
        progress: bool = typer.Option(True, help="show a progress bar")):
    """Run a distillation recipe."""
    from kdistill import load_recipe
    from kdistill.engine.run import run_recipe

    recipe_obj = load_recipe(recipe, set_ or [], output)
    saved_in = Path(recipe).expanduser().parent
    if (Path(recipe).name == "config.resolved.yaml" and output is None
            and saved_in.resolve() != Path(recipe_obj.output).expanduser().resolve()):
        # a run folder moved since: its saved recipe still names the old place, which would get a new run
        warnings.warn(f"{recipe} is the saved recipe of the run in {saved_in}, but it trains into "
                      f"{recipe_obj.output} (its output field); add --output {saved_in} to continue that run",
                      stacklevel=2)
    # not kdistill.distill: its refusals name the Python keywords, these name this command's flags
    student = run_recipe(recipe_obj, resume=resume, force=force, console=console, progress=progress)
    if os.environ.get("RANK", "0") == "0":  # once, not once per process, under torchrun or accelerate
        console.print(f"[green]done[/]: student saved to {student}")


@app.command()
@friendly
def validate(recipe: str = typer.Argument(..., help="recipe YAML file or built-in recipe name"),
             set_: Optional[List[str]] = SetOpt,
             full: bool = typer.Option(False, help="also load models and data to check that they pair")):
    """Check a recipe without running it."""
    from kdistill import load_recipe

    from kdistill.engine.run_dir import check_not_foreign, check_output
    from kdistill.recipe_pairing import describe_and_pair
    from kdistill.recipe_references import check_references

    r = load_recipe(recipe, set_ or [])
    check_references(r)
    from kdistill.recipe_references import hub_notes

    for note in hub_notes(r):
        console.print(note, highlight=False, markup=False, soft_wrap=True)
    check_output(Path(r.output))
    check_not_foreign(Path(r.output))  # run refuses it: so does validate
    describe_and_pair(r, full, console)
    console.print(f"[green]ok[/]: {r.name} is valid ({len(r.stages)} stage{'s' if len(r.stages) > 1 else ''}) -> {r.output}")


@app.command()
def recipes():
    """List the built-in recipes."""
    from rich.table import Table

    from kdistill.config import builtin_recipes

    table = Table("name", "what it does")
    for name, path in builtin_recipes().items():
        table.add_row(name, recipe_summary(path.read_text()))
    console.print(table)


def recipe_summary(text: str, longest: int = 300) -> str:
    """A recipe's opening comment up to the end of its first sentence (it may wrap over several lines; an
    indented comment line starts a list, which the summary leaves out); past `longest` characters, cut at a word
    and marked with an ellipsis."""
    import re

    lines = []
    for line in text.splitlines():
        if not line.startswith("#") or (lines and line.startswith("#  ")):
            break
        lines.append(line.lstrip("#").strip())
    words = " ".join(lines)
    end = re.search(r"[.;](\s+(?=[A-Z(`])|$)", words)  # not "et al. 2022"
    summary = (words[:end.start() + 1] if end else words).rstrip(":;").strip()
    return summary if len(summary) <= longest else summary[:longest].rsplit(" ", 1)[0].rstrip(",;:") + " …"


@app.command("eval")
@friendly
def eval_cmd(student: str = typer.Option(..., help="student: directory, hub id, packaged:NAME or recipe:NAME"),
             teacher: Optional[str] = typer.Option(None, help="teacher: directory, hub id, packaged:NAME or "
                                                   "recipe:NAME (a built-in recipe's trained model)"),
             data: List[str] = typer.Option(..., help="built-in corpus name, a .jsonl/.csv/.txt file, or dataset:NAME; repeatable"),
             split: str = typer.Option("eval", help="split of built-in corpora"),
             text: Optional[str] = typer.Option(None, help="the text field of --data files and datasets (default text)"),
             label: Optional[str] = typer.Option(None, help="their label field: accuracy for classifiers"),
             image: Optional[str] = typer.Option(None, help="their image field (file paths, or a dataset's images)"),
             limit: int = typer.Option(512, min=1, help="texts per dataset, taken evenly through its first 100×limit"),
             max_length: int = typer.Option(128, min=8, help="tokens per text"),
             speed: bool = typer.Option(True, help="measure encode speed (tens of seconds on a CPU)"),
             output: Optional[str] = typer.Option(None, help="write the JSON report here (default: STUDENT/eval.json "
                                                  "for a directory, else ./eval-NAME.json)"),
             trust_remote_code: bool = typer.Option(False, help="run the models' own Python code (a custom "
                                                    "architecture); off unless you trust its source")):
    """Compare a student with its teacher: size, speed, embedding fidelity, accuracy or perplexity."""
    from kdistill.eval.report import (check_replaceable_report, check_report_path, evaluate, render_table, save,
                                      spec_from_arg)

    from kdistill.teachers.recipe_runs import trained_model

    student = trained_model(student, "--student")
    if teacher is None:  # an embedding student has no metric of its own: the table would be empty
        import json

        made = Path(student) / "kdistill.json"
        try:  # only a hint: a damaged record of the run does not stop the evaluation
            trained_by = json.loads(made.read_text()).get("teacher") if made.is_file() else None
        except (OSError, ValueError, AttributeError):
            trained_by = None
        console.print("[yellow]no --teacher[/yellow]: the comparisons with a teacher (embedding fidelity, per-layer "
                      "CKA) are left out"
                      + (f"; this student was trained by --teacher {trained_by}" if trained_by else ""))
    path = Path(output).expanduser() if output else default_report(student)
    check_report_path(path, "--output", "eval.json")  # before the evaluation: after it, its results would be lost
    check_replaceable_report(path, "--output")
    from kdistill.data.sources import has_splits

    specs = [spec_from_arg(d, {"text": text, "label": label, "image": image}) for d in data]
    for spec in specs:
        if not has_splits(spec):  # so a user does not take its scores for held-out ones
            console.print(f"note: {spec['path']} is one split (a file, or a folder without train/ and test/ folders): "
                          f"all of it is scored (--split chooses among a corpus's or a dataset's splits)")
    result = evaluate(student, trained_model(teacher, "--teacher") if teacher else None, specs,
                      split=split, limit=limit, max_length=max_length, speed=speed,
                      trust_remote_code=trust_remote_code)
    console.print(render_table(result))
    tasks = {role: model["task"] for role, model in result["models"].items()}
    if label and not {"classification", "image-classification"} & set(tasks.values()):  # else they vanish unsaid
        console.print(f"[yellow]--label {label}[/yellow]: no model here is a classifier ("
                      + ", ".join(f"{role}: {task}" for role, task in tasks.items())
                      + "), so no accuracy is scored; its labels are not used")
    save(result, path)
    console.print(f"saved {path}")


def default_report(student: str) -> Path:
    """Beside a local student; a packaged or hub model's report goes to the working directory, not into a
    folder named after its reference (./packaged:NAME) or into the installed package."""
    if Path(student).expanduser().is_dir() and not student.startswith(("packaged:", "blueprint:")):
        return Path(student).expanduser() / "eval.json"
    return Path(f"eval-{student.replace(':', '-').replace('/', '-')}.json")


@app.command()
@friendly
def demo(steps: Optional[int] = typer.Option(None, min=1, help="training steps (default: the recipe's)"),
         output: str = typer.Option("runs/demo", help="run directory"),
         resume: bool = typer.Option(False, help="continue an interrupted demo")):
    """Distill the packaged all-MiniLM-L6-v2 into a 3-layer student and print teacher vs student."""
    from kdistill.demo import run_demo

    run_demo(console, steps=steps, output=output, resume=resume)


@app.command("compare")
@friendly(interrupted=COMPARE_HINT)
def compare_cmd(recipes: List[str] = typer.Argument(..., help="recipe names or files"),
                seeds: int = typer.Option(3, min=1, help="seeds per recipe"),
                quick: bool = typer.Option(False, help="1/8 of the steps: a fast look at the direction"),
                output: str = typer.Option("runs/compare", help="where the runs go (reused when complete)"),
                results: str = typer.Option("docs/results.md", help="markdown file for the table (from where it runs)"),
                baselines: bool = typer.Option(True, help="also train each recipe's no-teacher baseline"),
                jobs: Optional[int] = typer.Option(
                    None, min=1, help="runs trained at once, each in its own process with the cores shared out "
                                      "(default: 2 without a GPU on 2 cores or more, else 1)"),
                progress: bool = typer.Option(True, help="show each run's progress bar (runs trained at once, "
                                                         "--jobs 2 or more, show none)")):
    """Each recipe against a no-teacher baseline (same student, same init, labels only), on test data."""
    from kdistill.compare import compare
    from kdistill.compare_parallel import default_jobs
    from kdistill.compare_report import markdown

    jobs = default_jobs() if jobs is None else jobs
    report = compare(recipes, seeds, quick, output, results, console, baselines=baselines, jobs=jobs,
                     progress=progress)
    console.print(markdown(report))


@app.command("cache-teacher")
@friendly
def cache_teacher_cmd(recipe: Optional[str] = typer.Argument(None, help="recipe name or file whose teacher to cache"),
                      k: int = typer.Option(64, min=1, help="top-k log-probabilities kept per position"),
                      stage: Optional[int] = typer.Option(None, help="which stage's teacher and training data (default 0)"),
                      out: Optional[str] = typer.Option(None, help="store directory (default: OUTPUT/teacher-store; "
                                                                   "with --from-store: STORE-kK)"),
                      temperature: Optional[float] = typer.Option(None, help="default: the stage's KD temperature"),
                      dtype: Optional[str] = typer.Option(None, help="float16 (default) or float32 log-probabilities"),
                      from_store: Optional[str] = typer.Option(
                          None, help="cut this existing store (a larger k) down to --k instead of running the teacher"),
                      next_token: bool = typer.Option(
                          True, help="causal LM: keep each position's next token beside the top k (perplexity)"),
                      sample: Optional[int] = typer.Option(
                          None, min=1, help="store this many tokens drawn from the teacher per position instead of "
                                            "the top k (--k is then unused; forward KL only)"),
                      sample_head: int = typer.Option(
                          0, min=0, help="with --sample: also keep the teacher's H most likely tokens exactly and "
                                         "draw from the rest of its distribution"),
                      set_: Optional[List[str]] = SetOpt):
    """Run the teacher once over the training data and store its top-k outputs; then train with
    `teacher: {source: cache, path: STORE}` (no teacher weights needed)."""
    from kdistill.config import load_recipe
    from kdistill.errors import ConfigError
    from kdistill.teachers.store_build import cache_teacher
    from kdistill.teachers.store import narrow_store, storage_report

    if dtype not in (None, "float16", "float32"):
        raise ConfigError(f"--dtype {dtype}: a store keeps float16 or float32 log-probabilities")
    if from_store:
        given = [name for name, value in (("RECIPE", recipe), ("--stage", stage), ("--temperature", temperature),
                                          ("--dtype", dtype), ("--set", set_), ("--no-next-token", not next_token), ("--sample", sample),
                                          ("--sample-head", sample_head))
                 if value]
        if given:
            raise ConfigError(f"--from-store cuts an existing store as it is (its data, temperature and dtype); "
                              f"drop {', '.join(given)}")
        path = narrow_store(from_store, out or f"{from_store.rstrip('/')}-k{k}", k)
    elif sample_head and not sample:
        raise ConfigError("--sample-head H keeps the top H beside --sample N draws; add --sample N (or drop it)")
    elif recipe is None:
        raise ConfigError("cache-teacher needs a RECIPE whose teacher to run (or --from-store STORE to cut a store)")
    else:
        path = cache_teacher(load_recipe(recipe, set_ or []), stage or 0, k, out, temperature=temperature,
                             dtype=dtype or "float16", console=console, next_token=next_token, sample=sample,
                             sample_head=sample_head)
    report = storage_report(path)
    console.print(f"wrote {path}: {report.bytes_per_position:.0f} bytes per position on disk vs "
                  f"{report.dense_bytes_per_position:,} for full float32 logits "
                  + (f"({report.compression:.0f}× smaller)" if report.compression >= 1.5 else
                     f"({1 / report.compression:.1f}× their size: a store saves space only where k is well under the "
                     f"number of outputs; {'--sample and --sample-head set it' if sample else '--k sets it'})"))


@app.command("export")
@friendly
def export_cmd(model_dir: str = typer.Argument(..., help="a finished student directory (or a run directory)"),
               out: str = typer.Argument(..., help="where to write the exported model"),
               packed: bool = typer.Option(False, "--packed", help="pack 1-bit weights into bits (8 per byte); "
                                           "required: the one export format so far")):
    """Export a student. --packed: a real 1-bit model (signs as bits + one scale per row) that
    `kdistill.load_model` / `kdistill eval` load back with the same outputs."""
    from pathlib import Path

    from kdistill.errors import ConfigError
    from kdistill.quant.packing import check_export_target, export_packed, is_packed_export

    source = Path(model_dir)
    if (source / "student" / "config.json").exists():
        source = source / "student"
    check_export_target(source, Path(out))  # a missing source is named before the format is
    if not packed:
        raise ConfigError("export has one format so far: add --packed (a student directory is already a "
                          "Hugging Face model directory)")
    if is_packed_export(Path(out)):  # the check above let only an earlier export through: say it goes
        console.print(f"replacing the earlier export in {out}")
    report = export_packed(str(source), out)
    fp = report["quantized_linear_fp32_bytes"]
    console.print(f"wrote {out}: quantized linear weights {report['quantized_linear_packed_bytes']:,} bytes packed "
                  f"vs {fp:,} bytes FP32 (1/{fp / report['quantized_linear_packed_bytes']:.1f}); "
                  f"file {report['packed_file_bytes']:,} bytes"
                  + (f" vs {report['source_file_bytes']:,}" if report["source_file_bytes"] else ""))


# the API-based family's commands (compare-pad, compare-lion, cache-api-teacher, serve-teacher) join the app here
from kdistill import cli_api  # noqa: E402,F401


def main():
    app(prog_name="kdistill")


if __name__ == "__main__":
    main()
