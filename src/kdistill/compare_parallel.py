"""`kdistill compare --jobs N`: the comparison's runs trained and scored N at a time, each in a process of its
own with the machine's cores shared out. A small student's step does not keep two cores busy: on this 2-core
machine the encoder comparison's 39 runs, two at a time on one thread each, trained 1.49x as fast as one at a
time on two threads, and the start-up of each run (reading data, loading the teacher), on one core, overlaps too.

The runs are independent once the teacher is trained, except runs of one seed that share leading stages
(BinaryBERT's W1A8 and W1A1 pipelines): those go to one process, in order, so the later copies the earlier's
stages instead of training them again beside it. Each process writes what a run prints to FOLDER/seed-S.log.
The floats of a one-thread run differ from a two-thread one's in the last digits (sums taken in another
order), as between two machines; the runs are reused by later compares either way.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from kdistill.config import Recipe
from kdistill.errors import KdistillError


def default_jobs() -> int:
    """Two runs at a time on a machine without a GPU and with two cores or more (measured above: 1.49x the
    work of one run at a time here); one on a GPU, which one run already keeps busy."""
    import torch

    return 2 if not torch.cuda.is_available() and (os.cpu_count() or 1) >= 2 else 1


@dataclass
class Job:
    """One run of a comparison: its label in the table, the run, and what it is scored on."""
    label: str
    run: Recipe
    records: list[dict]
    task: str

    @property
    def log(self) -> Path:
        return Path(self.run.output).with_name(Path(self.run.output).name + ".log")

    @property
    def seed(self) -> int:
        return self.run.stages[0].train.seed


def chains(jobs: list[Job]) -> list[list[Job]]:
    """The jobs grouped so that runs sharing leading stages are one group, in their order; the rest alone."""
    from kdistill.compare_runs import leading_stages_alike

    groups: list[list[Job]] = []
    for job in jobs:
        home = next((g for g in groups if any(leading_stages_alike(job.run, other.run) for other in g)), None)
        if home is None:
            groups.append([job])
        else:
            home.append(job)
    return groups


@contextlib.contextmanager
def into(log):
    """What the libraries print during a run (transformers' loading and writing bars and its load reports) goes
    to the run's log too: the terminal is the table's, which shows each run's one-line result. Logging needs
    its own redirect: a handler keeps the stream it was made with."""
    import logging

    library = logging.getLogger("transformers")
    kept = library.handlers[:]
    library.handlers = [logging.StreamHandler(log)]
    try:
        with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
            yield
    finally:
        library.handlers = kept


def exit_with_parent(parent: int, every: float = 1.0) -> None:
    """Run in each worker as it starts: once the compare process that started it is gone, the worker ends too.
    A Ctrl-C reaches every process of the terminal, but `kill`, a scheduler's time limit or the out-of-memory killer
    reach the parent alone; its workers would train on unseen, and a rerun of compare would then train the same run
    folders beside them. Checkpoints are written to a temporary folder and renamed, so ending mid-step loses only
    the steps since the last one."""
    def watch() -> None:
        while os.getppid() == parent:  # an orphan is handed to another parent (init or a subreaper)
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="kdistill-exit-with-parent", daemon=True).start()


def run_chain(chain: list[Job], threads: int) -> list[float]:
    """Train (or reuse) and score each run of a chain in this process; returns each run's last score."""
    import torch
    from rich.console import Console

    from kdistill.compare import METRICS, evaluation_points, score_once
    from kdistill.compare_runs import reuse_shared_stages, train_or_reuse
    from kdistill.engine.stage_refs import stage_student_dir

    torch.set_num_threads(threads)
    done, scores = [], []
    for job in chain:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        with job.log.open("a") as log, into(log):
            console = Console(file=log, width=120, force_terminal=False, emoji=False)
            try:
                reuse_shared_stages(job.run, done)
                train_or_reuse(job.run, console, progress=False)
                for suffix, index in evaluation_points(job.run):
                    student = stage_student_dir(Path(job.run.output), job.run, index)
                    score = score_once(student, job.records, job.task, trust_remote_code=job.run.trusts_remote_code)[0]
                    console.print(f"{job.label}{suffix} seed {job.seed}: test {METRICS[job.task]} {score:.4f} ({student})")
            except KdistillError as err:
                log.write(traceback.format_exc())
                raise type(err)(f"{job.label} seed {job.seed}: {err}") from None
            except Exception as err:
                log.write(traceback.format_exc())
                raise RuntimeError(f"{job.label} seed {job.seed} failed (a bug in kdistill; its log: {job.log})") from err
        done.append(job.run)
        scores.append(score)
    return scores


def train_in_parallel(jobs: list[Job], workers: int, console=None) -> None:
    """Every job trained and scored, `workers` processes at a time. The first failure stops the jobs not yet
    started and is raised once the ones under way end (their runs, finished or checkpointed, are kept)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from kdistill.compare import METRICS

    groups = chains(jobs)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // workers)
    if console is not None:
        console.print(f"training {len(jobs)} runs, {workers} at a time, {threads} thread(s) each; "
                      f"each run's output goes to FOLDER/seed-S.log")
    began, count, failure = time.perf_counter(), 0, None
    waiting = list(groups)
    # spawn, not fork: a forked child inherits the parent's OpenMP thread pool in an unusable state
    with ProcessPoolExecutor(max_workers=min(workers, len(groups)),
                             mp_context=multiprocessing.get_context("spawn"),
                             initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        pending: dict = {}
        while pending or (waiting and failure is None):
            # handed over one at a time: the executor would queue more ahead, where a failure can no longer stop them
            while waiting and failure is None and len(pending) < workers:
                group = waiting.pop(0)
                pending[pool.submit(run_chain, group, threads)] = group
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                group = pending.pop(future)
                try:
                    scores = future.result()
                except Exception as err:  # noqa: BLE001 - raised below, after the runs under way end
                    if failure is None and console is not None:
                        console.print(f"[red]{err}[/red]; stopping after the runs under way")
                    failure = failure or err
                    continue
                for job, score in zip(group, scores):
                    count += 1
                    if console is not None:
                        console.print(f"[bold][{count}/{len(jobs)}][/bold] {job.label} seed {job.seed}: test "
                                      f"{METRICS[job.task]} {score:.4f} ({(time.perf_counter() - began) / 60:.0f} min in)")
    if failure is not None:
        raise failure
