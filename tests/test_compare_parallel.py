"""`kdistill compare --jobs N` on tiny models: runs trained in worker processes, then reused by the table."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from kdistill.compare import compare
from kdistill.compare_parallel import Job, chains, train_in_parallel
from kdistill.compare_runs import variant
from kdistill.errors import KdistillError
from test_compare import tiny_kd_file, two_stage_pipeline


def test_runs_trained_in_workers_are_those_the_table_scores(tmp_path, make_classifier, monkeypatch):
    import kdistill.engine.run as engine_run
    from rich.console import Console

    path = tiny_kd_file(tmp_path, make_classifier, save_every=1)

    def no_training(*args, **kwargs):
        raise AssertionError("the table's pass trained a run the workers should have finished")

    # the workers are other processes: only the table's own pass, in this one, sees the patch
    monkeypatch.setattr(engine_run, "run_recipe", no_training)
    console = Console(record=True, width=200)
    report = compare([str(path)], seeds=2, output=str(tmp_path / "runs"), results=str(tmp_path / "r.md"),
                     console=console, jobs=2)
    assert [row["name"] for row in report["rows"]] == ["tiny-kd", "tiny-kd-baseline"]
    text = console.export_text()
    assert "training 4 runs, 2 at a time" in text and text.count("[4/4]") == 1  # the workers' count
    root = tmp_path / "runs" / "full"
    for row, folder in zip(report["rows"], [root / "tiny-kd", *root.glob("baselines/*")]):
        for seed in range(2):
            kept = json.loads((folder / f"seed-{seed}" / "student" / "test-scores.json").read_text())
            # the test score once, by the worker; the unseen-domain score by the table's pass
            assert sorted(v["score"] for v in kept.values()) == sorted([row["score"][seed], row["unseen"][seed]])
            assert f"seed {seed}: test accuracy {row['score'][seed]:.4f}" in (folder / f"seed-{seed}.log").read_text()
            assert not (folder / f"seed-{seed}" / "checkpoints").exists()  # finished: its student is what is reused
    again = compare([str(path)], seeds=2, output=str(tmp_path / "runs"), results=str(tmp_path / "r.md"))
    assert [row["score"] for row in again["rows"]] == [row["score"] for row in report["rows"]]


def test_runs_sharing_leading_stages_go_to_one_worker_in_order(tmp_path, make_classifier):
    pipeline = two_stage_pipeline(tmp_path, make_classifier)
    a0, b0, a1, c0 = (variant(pipeline(name, steps, alpha), seed, False, tmp_path / f"{name}{seed}")
                      for name, steps, alpha, seed in (("a", 2, 0.5, 0), ("b", 2, 0.9, 0), ("a", 2, 0.5, 1),
                                                       ("c", 3, 0.9, 0)))
    jobs = [Job(r.name, r, [], "classification") for r in (a0, b0, a1, c0)]
    # b shares a's first stage at seed 0; seed 1 and a longer first stage share nothing
    assert [[job.run for job in group] for group in chains(jobs)] == [[a0, b0], [a1], [c0]]


def test_a_failing_run_is_named_and_stops_the_rest(tmp_path, make_classifier):
    pipeline = two_stage_pipeline(tmp_path, make_classifier)
    runs = [variant(pipeline("a", 2, 0.5), seed, False, tmp_path / f"a/seed-{seed}") for seed in range(3)]
    shutil.rmtree(tmp_path / "teacher")  # every run's teacher is gone
    with pytest.raises(KdistillError, match=r"^a seed \d: .*teacher"):
        train_in_parallel([Job("a", r, [], "classification") for r in runs], 2)
    logs = sorted(p.name for p in (tmp_path / "a").glob("*.log"))
    assert logs and len(logs) < 3 and "Error" in (tmp_path / "a" / logs[0]).read_text()  # the third never started


def test_what_a_worker_run_prints_goes_to_its_log_not_the_terminal(tmp_path, make_classifier, capfd):
    """The terminal of a --jobs compare shows the workers' one-line results; a run's progress bars and
    library messages (transformers' loading bars while it scores; the run itself draws none) belong in its log."""
    import torch

    from kdistill.compare_parallel import run_chain
    from kdistill.config import load_recipe

    path = tiny_kd_file(tmp_path, make_classifier)
    run = variant(load_recipe(str(path)), 0, False, tmp_path / "tiny-kd" / "seed-0")
    capfd.readouterr()  # what making the tiny teacher printed
    [score] = run_chain([Job("tiny-kd", run, [{"text": "red thing 1", "label": "red"}], "classification")],
                        torch.get_num_threads())
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == ""
    log = (tmp_path / "tiny-kd" / "seed-0.log").read_text()
    assert f"tiny-kd seed 0: test accuracy {score:.4f}" in log and "Loading weights" in log


def test_a_worker_run_log_takes_the_libraries_logging_too(tmp_path, capfd):
    import logging

    from transformers.utils import logging as hf_logging

    from kdistill.compare_parallel import into

    # transformers' own handler is made before the run (error: the tests run transformers at that verbosity)
    hf_logging.get_logger("transformers.modeling_utils")
    before = logging.getLogger("transformers").handlers[:]
    with (tmp_path / "run.log").open("a") as log, into(log):
        hf_logging.get_logger("transformers.modeling_utils").error("classifier.weight | MISSING")
    printed = capfd.readouterr()
    assert "MISSING" not in printed.err + printed.out
    assert "classifier.weight | MISSING" in (tmp_path / "run.log").read_text()
    assert logging.getLogger("transformers").handlers == before  # the terminal's handler is back


WORKER_SCRIPT = """
import multiprocessing, os, time
from concurrent.futures import ProcessPoolExecutor
from kdistill.compare_parallel import exit_with_parent

if __name__ == "__main__":
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=exit_with_parent, initargs=(os.getpid(), 0.1)) as pool:
        print(pool.submit(os.getpid).result(), flush=True)
        pool.submit(time.sleep, 120)
        time.sleep(120)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (a container's init may be slow to reap an orphan that exited)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="this machine has no /proc to read process states from")
def test_a_worker_ends_when_its_compare_process_is_killed(tmp_path):
    # SIGKILL reaches the parent alone, as `kill`, a time limit or the OOM killer do: its worker must not train on
    script = tmp_path / "parent.py"
    script.write_text(WORKER_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        time.sleep(0.5)
        assert _running(worker)  # busy in its sleep while the parent lives
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 15
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(worker)
    finally:
        parent.kill()
