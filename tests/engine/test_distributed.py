"""Two CPU processes through `torchrun` make the same updates as one process on the same global batch."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kdistill import distill


def losses(run_dir, kind="train"):
    lines = (Path(run_dir) / "logs" / "main.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if json.loads(line)["kind"] == kind]


def eval_parts(run_dir):
    lines = (Path(run_dir) / "logs" / "main.jsonl").read_text().splitlines()
    return [json.loads(line)["parts"] for line in lines if json.loads(line)["kind"] == "eval"]


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun launcher not installed")
def test_two_processes_match_one(tiny_recipe, tmp_path):
    # a random student (large, clean gradients), narrower than the teacher: hidden_mse fits its projector
    # on every process and takes rank 0's
    tiny_recipe["student"] = {"config": {"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 32}}
    tiny_recipe["train"].update(steps=3, batch_size=8)
    # three eval batches (8, 8, 4): each process scores its share and the totals are added
    tiny_recipe["data"]["eval"]["limit"] = 20
    one = distill({**tiny_recipe, "output": str(tmp_path / "one")}, progress=False)

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**tiny_recipe, "output": str(tmp_path / "two")}))
    # not `accelerate launch --cpu --num_processes 2`, which starts a single process
    launcher = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [launcher, "--nproc_per_node", "2", "-m", "kdistill", "run", str(recipe), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    made_by = json.loads((tmp_path / "two" / "student" / "kdistill.json").read_text())
    assert made_by["processes"] == 2 and json.loads((one / "kdistill.json").read_text())["processes"] == 1

    # the same run again without --resume: the main process's refusal, said once, and no other process's traceback
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    said = again.stdout + again.stderr
    assert again.returncode != 0 and said.count("already holds a run; pass --resume") == 1
    assert "Connection closed" not in said and "exitcode  : 2" in said

    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    assert eval_parts(tmp_path / "two") and len(eval_parts(tmp_path / "two")) == len(eval_parts(tmp_path / "one"))
    for split, whole in zip(eval_parts(tmp_path / "two"), eval_parts(tmp_path / "one")):
        assert split == pytest.approx(whole, abs=1e-5)
    a, b = load_file(str(one / "model.safetensors")), load_file(str(tmp_path / "two" / "student" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun launcher not installed")
def test_prokt_evaluates_on_two_processes_when_one_has_no_eval_batch(prokt_recipe, tmp_path):
    # ProKT's teacher trains through a DDP wrapper whose forward is a collective (a buffer broadcast): a process with
    # no eval batch of its own must not be left waiting for it (the run hung)
    recipe = {**prokt_recipe, "train": {"steps": 2, "batch_size": 4, "eval_every": 1}}
    train = prokt_recipe["data"]["train"]
    recipe["data"] = {**prokt_recipe["data"], "eval": {**train, "limit": 4}}  # one eval batch for two processes
    one = distill({**recipe, "output": str(tmp_path / "one")}, progress=False)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**recipe, "output": str(tmp_path / "two")}))
    launcher = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launch = subprocess.Popen([launcher, "--nproc_per_node", "2", "-m", "kdistill", "run", str(path), "--no-progress"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, err = launch.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        launch.terminate()  # torchrun stops its workers (each in a session of its own) on SIGTERM
        launch.communicate(timeout=60)
        pytest.fail("two processes hung in evaluation")
    assert launch.returncode == 0, out[-2000:] + err[-4000:]

    def evals(run_dir):
        lines = (Path(run_dir) / "logs" / "main.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k in ("accuracy", "loss")}
                for line in lines if json.loads(line)["kind"] == "eval"]

    assert len(evals(tmp_path / "two")) == 2 and all("accuracy" in e for e in evals(tmp_path / "two"))
    assert evals(tmp_path / "two")[0] == pytest.approx(evals(one.parent)[0], abs=1e-5)  # before the processes differ
