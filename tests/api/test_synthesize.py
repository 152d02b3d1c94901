"""The synthesize stage: provenance rows, the execution filter's verdicts, refine, resume after a kill, the
API and local generators, the recipe schema and the engine's dispatch."""
from __future__ import annotations

import json
import socket

import pytest

from kdistill.api.generators import Sample
from kdistill.api.synthesize import is_synthesized, run_synthesis
from kdistill.config import load_recipe
from kdistill.errors import ConfigError, DataError

PROBLEMS = [  # hand-made records: a problem and its answer
    {"id": "p0", "problem": "two plus three", "answer": 5},
    {"id": "p1", "problem": "six times seven", "answer": 42},
    {"id": "p2", "problem": "ten minus four", "answer": 6},
    {"id": "p3", "problem": "nine divided by three", "answer": 3},
    {"id": "p4", "problem": "one plus one", "answer": 2},
]
RIGHT = {"p0": "print(2 + 3)", "p1": "print(6 * 7)", "p2": "print(10 - 4)", "p3": "print(9 // 3)", "p4": "print(1 + 1)"}


def write_problems(tmp_path, records=PROBLEMS):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


class Stub:
    """A generator that answers from a function of (prompt, candidate) and remembers what it was asked."""

    def __init__(self, answer, fail_on_call=None):
        self.answer, self.fail_on_call, self.calls, self.id = answer, fail_on_call, [], "stub-teacher"

    def check(self):
        pass

    def close(self):
        pass

    def sample(self, prompts, seeds, n, sampling, logprobs=False):
        self.calls.append(list(prompts))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt("killed mid-run")
        return [[Sample(self.answer(p, j), "stop", -0.5) for j in range(n)] for p in prompts]


def key_of(prompt):
    return next(r["id"] for r in PROBLEMS if r["problem"] in prompt)


def stage(tmp_path, **overrides):
    """A validated synthesize block over the hand-made problems."""
    block = {"teacher": {"model": "unused"}, "prompts": {"path": write_problems(tmp_path)},
             "template": "problem: {problem}\nprogram:\n", "candidates": 4, "batch_size": 2,
             "filter": {"type": "execution", "timeout_s": 2}, **overrides}
    recipe = load_recipe({"name": "s", "output": str(tmp_path / "run"), "stages": [{"name": "synth", "synthesize": block}]})
    return recipe.stages[0].synthesize


def rows(folder):
    return [json.loads(line) for line in (folder / "data.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- rows and verdicts


def test_execution_filter_keeps_right_programs_and_drops_the_rest_with_reasons(tmp_path):
    answers = ["{right}", "print(999)", "print(undefined_name)", "while True:\n    pass", ]

    def answer(prompt, j):
        return answers[j].format(right=RIGHT[key_of(prompt)]) if j < 4 else ""

    summary = run_synthesis(stage(tmp_path), tmp_path / "out", generator=Stub(answer), progress=False)
    out = rows(tmp_path / "out")
    assert len(out) == 5 * 4 and summary["kept"] == 5 and summary["candidates"] == 20
    by_candidate = {j: [r for r in out if r["candidate"] == j] for j in range(4)}
    assert all(r["kept"] and r["verdict"] == "correct" for r in by_candidate[0])
    assert all(not r["kept"] and r["verdict"] == "wrong_answer" and r["reason"] == "printed 999, which is not the answer"
               for r in by_candidate[1])
    assert all(r["verdict"] == "error" and "NameError" in r["reason"] for r in by_candidate[2])
    assert all(r["verdict"] == "timeout" for r in by_candidate[3])
    assert summary["dropped_by_verdict"] == {"wrong_answer": 5, "error": 5, "timeout": 5}
    first = out[0]  # provenance: everything needed to tell where a training row came from
    assert first["prompt"] == "problem: two plus three\nprogram:\n" and first["completion"] == "print(2 + 3)"
    assert first["text"] == first["prompt"] + first["completion"] and first["teacher"] == "stub-teacher"
    assert first["sampling"] == {"temperature": 0.8, "top_p": 1.0, "max_new_tokens": 128, "seed": 0}
    assert first["filter"] == "execution" and first["record"]["answer"] == 5 and first["mean_logprob"] == -0.5
    kept = [json.loads(line) for line in (tmp_path / "out" / "kept.jsonl").read_text().splitlines()]
    assert [r["id"] for r in kept] == ["p0", "p1", "p2", "p3", "p4"] and all(r["kept"] for r in kept)
    assert is_synthesized(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["kept"] == 5


def test_empty_silent_and_duplicate_candidates(tmp_path):
    answers = ["", "x = 5", "{right}", "{right}"]

    def answer(prompt, j):
        return answers[j].format(right=RIGHT[key_of(prompt)])

    summary = run_synthesis(stage(tmp_path), tmp_path / "out", generator=Stub(answer), progress=False)
    assert summary["by_verdict"] == {"empty": 5, "no_output": 5, "correct": 5, "duplicate": 5}
    dup = next(r for r in rows(tmp_path / "out") if r["verdict"] == "duplicate")
    assert dup["reason"] == "same completion as candidate 2" and not dup["kept"]
    kept_all = run_synthesis(stage(tmp_path, dedupe=False), tmp_path / "out2", generator=Stub(answer), progress=False)
    assert kept_all["kept"] == 10  # without dedupe the copy is judged (and kept) too


def test_filter_none_keeps_everything_and_threshold_uses_the_score(tmp_path):
    summary = run_synthesis(stage(tmp_path, filter={"type": "none"}), tmp_path / "none",
                            generator=Stub(lambda p, j: f"print({j})"), progress=False)
    assert summary["kept"] == 20 and summary["by_verdict"] == {"unchecked": 20}
    words = stage(tmp_path, filter={"type": "threshold", "score": "length", "min": 2})
    summary = run_synthesis(words, tmp_path / "length", generator=Stub(lambda p, j: f"a b{j}" if j % 2 else f"a{j}"),
                            progress=False)
    assert summary["kept"] == 10 and summary["dropped_by_verdict"] == {"below_min": 10}


def test_a_threshold_filter_is_checked_when_the_recipe_is_read_not_after_generation():
    from kdistill.config import load_recipe
    from kdistill.errors import ConfigError

    for block, said in (("{type: threshold, score: lenght, min: 2}", r"filter.score: unknown scorer 'lenght'; did you "
                         r"mean 'length'"), ("{type: threshold, score: length}", r"filter: .*needs min, max or both")):
        with pytest.raises(ConfigError, match=said):
            load_recipe("pad", [f"stages.0.synthesize.filter={block}"])


def test_refine_feeds_the_error_back_once(tmp_path):
    def answer(prompt, j):
        if "# that program is wrong:" in prompt:  # the refine prompt: fix it (p1 stays wrong)
            return "print(0)" if "six times seven" in prompt else RIGHT[key_of(prompt)]
        return "print(0)"

    stub = Stub(answer)
    cfg = stage(tmp_path, candidates=1, filter={"type": "execution", "refine": True, "timeout_s": 2})
    summary = run_synthesis(cfg, tmp_path / "out", generator=stub, progress=False)
    assert summary["refine"] == {"tried": 5, "fixed": 4} and summary["kept"] == 4
    refine_prompts = [p for call in stub.calls for p in call if "# that program is wrong:" in p]
    assert len(refine_prompts) == 5  # once per failed candidate, never again
    assert "printed 0, which is not the answer" in refine_prompts[0] and "print(0)" in refine_prompts[0]
    assert "5" not in refine_prompts[0].split("# that program is wrong:")[1].splitlines()[0]  # the answer, never
    fixed = next(r for r in rows(tmp_path / "out") if r["id"] == "p0")
    assert fixed["refined"] and fixed["kept"] and fixed["completion"] == "print(2 + 3)"
    assert fixed["first_attempt"] == {"completion": "print(0)", "verdict": "wrong_answer", "reason": "printed 0, which is not the answer"}
    assert fixed["text"] == "problem: two plus three\nprogram:\nprint(2 + 3)"  # trains on the original prompt
    still = next(r for r in rows(tmp_path / "out") if r["id"] == "p1")
    assert still["refined"] and not still["kept"] and still["verdict"] == "wrong_answer"


def test_a_killed_run_resumes_without_regenerating_finished_prompts(tmp_path):
    def answer(prompt, j):
        return RIGHT[key_of(prompt)] if j == 0 else f"print({j})"

    cfg = stage(tmp_path, filter={"type": "none"})
    straight = run_synthesis(cfg, tmp_path / "straight", generator=Stub(answer), progress=False)
    with pytest.raises(KeyboardInterrupt):  # dies in its second batch (prompts p2, p3)
        run_synthesis(cfg, tmp_path / "killed", generator=Stub(answer, fail_on_call=2), progress=False)
    assert len(rows(tmp_path / "killed")) == 8 and not is_synthesized(tmp_path / "killed")
    with (tmp_path / "killed" / "data.jsonl").open("a") as f:
        f.write('{"id": "p2", "candid')  # and a torn line, as a kill during a write leaves
    again = Stub(answer)
    resumed = run_synthesis(cfg, tmp_path / "killed", resume=True, generator=again, progress=False)
    asked = [p for call in again.calls for p in call]
    assert [key_of(p) for p in asked] == ["p2", "p3", "p4"]  # p0 and p1 were finished: not asked again
    assert rows(tmp_path / "killed") == rows(tmp_path / "straight")
    assert resumed["kept"] == straight["kept"] and resumed["prompts_resumed"] == 2


def test_generator_failures_are_recorded_and_asked_again_on_resume(tmp_path):
    class Flaky(Stub):
        def sample(self, prompts, seeds, n, sampling, logprobs=False):
            out = super().sample(prompts, seeds, n, sampling, logprobs)
            if self.broken:
                out[0][1] = Sample("", error="HTTP 503: overloaded")
            return out

    from kdistill.api.client import TeacherRequestError

    flaky = Flaky(lambda p, j: f"print({j})")
    flaky.broken = True
    with pytest.raises(TeacherRequestError, match=r"failed 3 of 5 prompts .*HTTP 503: overloaded.*--resume"):
        run_synthesis(stage(tmp_path, filter={"type": "none"}), tmp_path / "out", generator=flaky, progress=False)
    failed = [r for r in rows(tmp_path / "out") if r["verdict"] == "teacher_error"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["dropped_by_verdict"] == {"teacher_error": 3} and failed[0]["reason"] == "HTTP 503: overloaded"
    assert not is_synthesized(tmp_path / "out")  # so a resumed run does not take the set as finished
    flaky.broken, flaky.calls = False, []
    summary = run_synthesis(stage(tmp_path, filter={"type": "none"}), tmp_path / "out", resume=True, generator=flaky,
                            progress=False)
    assert sorted(key_of(p) for call in flaky.calls for p in call) == ["p0", "p2", "p4"]
    assert summary["kept"] == 20 and "teacher_error" not in summary["by_verdict"]


def test_skip_trains_without_the_prompts_the_teacher_failed_on(tmp_path):
    class Flaky(Stub):
        def sample(self, prompts, seeds, n, sampling, logprobs=False):
            out = super().sample(prompts, seeds, n, sampling, logprobs)
            out[0][0] = Sample("", error="HTTP 400: content policy")
            return out

    summary = run_synthesis(stage(tmp_path, filter={"type": "none"}, on_teacher_error="skip"), tmp_path / "out",
                            generator=Flaky(lambda p, j: f"print({j})"), progress=False)
    assert summary["complete"] and summary["teacher_errors"] == 3 and is_synthesized(tmp_path / "out")


def test_missing_template_field_names_it(tmp_path):
    with pytest.raises(DataError, match=r"\{question\}.*fields there: answer, id, problem"):
        run_synthesis(stage(tmp_path, template="Q: {question}"), tmp_path / "out", generator=Stub(lambda p, j: ""),
                      progress=False)


# ---------------------------------------------------------------- real generators


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_api_teacher_at_start_is_one_clear_error(tmp_path):
    from kdistill.api.client import TeacherUnavailable

    cfg = stage(tmp_path, teacher={"api": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "m",
                                           "max_retries": 0}})
    with pytest.raises(TeacherUnavailable, match=r"did not answer.*serve-teacher"):
        run_synthesis(cfg, tmp_path / "out", progress=False)
    assert not is_synthesized(tmp_path / "out")


def test_api_teacher_through_the_server_with_a_durable_cache(tmp_path, tiny_gpt2_dir):
    from kdistill.api.server import TeacherServer

    with TeacherServer(tiny_gpt2_dir, port=0) as server:
        api = {"base_url": server.url, "model": server.model_name, "max_concurrency": 2}
        cfg = stage(tmp_path, teacher={"api": api}, candidates=2, sampling={"max_new_tokens": 4, "seed": 1},
                    filter={"type": "threshold", "score": "mean_logprob", "min": -1e9})
        summary = run_synthesis(cfg, tmp_path / "out", progress=False)
        first = rows(tmp_path / "out")
        assert summary["candidates"] == 10 and first[0]["teacher"] == f"{server.url} {server.model_name}"
        assert all(r["mean_logprob"] is not None and r["mean_logprob"] <= 0 for r in first if r["verdict"] == "passed")
        assert (tmp_path / "out" / "teacher.sqlite").exists()
        # a second run on the same cache asks the service nothing and writes the same candidates
        shared = stage(tmp_path, teacher={"api": api}, candidates=2, sampling={"max_new_tokens": 4, "seed": 1},
                       filter={"type": "threshold", "score": "mean_logprob", "min": -1e9},
                       cache=str(tmp_path / "out" / "teacher.sqlite"))
        from kdistill.api.synthesize import Synthesis

        again = Synthesis(shared, tmp_path / "again", progress=False)
        again.run()
        assert again.generator.client.requests_sent == 1  # the GET /models of check(), no completions
        assert [r["completion"] for r in rows(tmp_path / "again")] == [r["completion"] for r in first]


def test_local_generator_is_seeded_and_cached(tmp_path, tiny_gpt2_dir):
    from kdistill.api.generators import LocalGenerator
    from kdistill.config import Sampling, GeneratorTeacher

    sampling = Sampling(temperature=1.0, max_new_tokens=5)
    generator = LocalGenerator(GeneratorTeacher(model=tiny_gpt2_dir), cache_path=tmp_path / "gen.sqlite")
    a = generator.sample(["one two", "a much longer prompt here"], [1, 2], 3, sampling)
    assert [len(row) for row in a] == [3, 3] and all(s.mean_logprob is not None for row in a for s in row)
    generator.cache.close()
    fresh = LocalGenerator(GeneratorTeacher(model=tiny_gpt2_dir))
    assert fresh.sample(["one two", "a much longer prompt here"], [1, 2], 3, sampling) == a  # same seeds, same text
    assert fresh.sample(["one two", "a much longer prompt here"], [5, 2], 3, sampling) != a
    cached = LocalGenerator(GeneratorTeacher(model=tiny_gpt2_dir), cache_path=tmp_path / "gen.sqlite")
    cached._generate = None  # answered from the cache, or this would fail
    assert cached.sample(["one two", "a much longer prompt here"], [1, 2], 3, sampling) == a


# ---------------------------------------------------------------- schema and engine


def synth_recipe(tmp_path, problems_path, **student_stage):
    return {
        "name": "synth-then-train", "output": str(tmp_path / "run"),
        "stages": [
            {"name": "synth", "synthesize": {"teacher": {"model": "unused"}, "prompts": {"path": problems_path},
                                             "template": "problem: {problem}\nprogram:\n", "candidates": 2,
                                             "filter": {"type": "execution", "timeout_s": 2}}},
            {"name": "student", "teacher": {"model": "TEACHER", "task": "causal-lm"},
             "student": {"from_teacher": {"layers": [1]}},
             "data": {"train": {"path": "stage:synth"}, "max_length": 32}, "losses": [{"type": "cross_entropy"}],
             "train": {"steps": 2, "batch_size": 2}, **student_stage},
        ],
    }


def test_schema_catches_what_a_synthesize_stage_cannot_be(tmp_path):
    raw = synth_recipe(tmp_path, "x.jsonl")
    load_recipe(raw)
    bad = json.loads(json.dumps(raw))
    bad["stages"][0]["losses"] = [{"type": "cross_entropy"}]
    with pytest.raises(ConfigError, match=r"stages\[0\]: a synthesize stage trains nothing: remove losses"):
        load_recipe(bad)
    bad = json.loads(json.dumps(raw))
    bad["stages"][1]["data"]["train"]["path"] = "stage:student"
    with pytest.raises(ConfigError, match=r"stages\[1\]\.data\.train\.path: 'stage:student' must name an earlier "
                                          r"synthesize stage"):
        load_recipe(bad)
    bad["stages"].insert(0, {"name": "first", "teacher": {"model": "T"}, "student": {"model": "S"},
                             "data": {"train": {"source": "stdlib-docstrings"}}, "losses": [{"type": "cross_entropy"}]})
    bad["stages"][2]["data"]["train"]["path"] = "stage:first"
    with pytest.raises(ConfigError, match=r"'first' is a training stage, which makes a model, not data"):
        load_recipe(bad)
    bad = json.loads(json.dumps(raw))
    bad["stages"][1]["teacher"]["model"] = "stage:synth"
    with pytest.raises(ConfigError, match=r"teacher\.model: 'stage:synth' must name an earlier stage that trains a "
                                          r"model; 'synth' is a synthesize stage"):
        load_recipe(bad)
    bad = json.loads(json.dumps(raw))
    bad["stages"][0]["synthesize"]["filter"] = {"type": "execution", "timout_s": 3}
    with pytest.raises(ConfigError, match=r"stages\[0\]\.synthesize\.filter\.timout_s: unknown field"):
        load_recipe(bad)
    bad["stages"][0]["synthesize"]["filter"] = {"type": "executoin"}
    with pytest.raises(ConfigError, match=r"unknown filter 'executoin' at stages\[0\]\.synthesize\.filter\.type; "
                                          r"did you mean 'execution'\?"):
        load_recipe(bad)
    bad["stages"][0]["synthesize"]["filter"] = {"type": "none"}
    bad["stages"][0]["synthesize"]["teacher"] = {"model": "m", "api": {"base_url": "http://x", "model": "m"}}
    with pytest.raises(ConfigError, match=r"synthesize\.teacher: give exactly one of model .* or api"):
        load_recipe(bad)


def test_engine_synthesizes_then_trains_on_the_kept_rows_and_resumes(tmp_path, tiny_gpt2_dir, monkeypatch):
    from kdistill import distill

    raw = synth_recipe(tmp_path, write_problems(tmp_path))
    raw["stages"][1]["teacher"]["model"] = tiny_gpt2_dir
    raw["stages"][1]["train"]["batch_size"] = 16  # over 5 kept rows: generated data is trained on, not refused
    stub = Stub(lambda p, j: RIGHT[key_of(p)] if j == 0 else "print(-1)")
    monkeypatch.setattr("kdistill.api.synthesize.make_generator", lambda *a, **k: stub)
    student = distill(raw, progress=False)
    assert student == tmp_path / "run" / "student" and (student / "config.json").exists()
    meta = json.loads((student / "kdistill.json").read_text())
    assert meta["config"]["data"]["train"]["path"] == str(tmp_path / "run" / "stages" / "synth" / "kept.jsonl")
    assert json.loads((tmp_path / "run" / "stages" / "synth" / "summary.json").read_text())["kept"] == 5
    resolved = (tmp_path / "run" / "config.resolved.yaml").read_text()
    assert "synthesize:" in resolved and "steps: 1000" not in resolved  # no training defaults on the synth stage
    calls = len(stub.calls)
    import shutil

    shutil.rmtree(student)  # the training stage is redone; the finished synthesize stage is not
    distill(raw, resume=True, progress=False)
    assert len(stub.calls) == calls and (student / "config.json").exists()


def test_a_stage_that_kept_nothing_says_so(tmp_path, tiny_gpt2_dir, monkeypatch):
    from kdistill import distill

    raw = synth_recipe(tmp_path, write_problems(tmp_path))
    raw["stages"][1]["teacher"]["model"] = tiny_gpt2_dir
    monkeypatch.setattr("kdistill.api.synthesize.make_generator", lambda *a, **k: Stub(lambda p, j: f"print(-{j + 1})"))
    with pytest.raises(DataError, match=r"stages\[1\]\.data\.train\.path: stage:synth kept none of its 10 candidates "
                                        r"\(dropped: \{'wrong_answer': 10\}\)"):
        distill(raw, progress=False)


def test_a_recipe_that_only_synthesizes_returns_its_data(tmp_path, monkeypatch):
    from kdistill import distill

    raw = synth_recipe(tmp_path, write_problems(tmp_path))
    raw["stages"] = raw["stages"][:1]
    monkeypatch.setattr("kdistill.api.synthesize.make_generator",
                        lambda *a, **k: Stub(lambda p, j: RIGHT[key_of(p)]))
    out = distill(raw, progress=False)
    assert out == tmp_path / "run" / "stages" / "synth" and (out / "kept.jsonl").exists()
