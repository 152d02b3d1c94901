"""PaD's pieces: the synthetic problem generator, execution accuracy against hand-made examples, the
pad recipes, and the comparison table."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

from kdistill.api import word_problems
from kdistill.api.word_problems import TEMPLATES, generate_problems, problem_records, read_problem_file
from kdistill.config import load_recipe
from kdistill.eval.execution import (answers_match, check_program, check_programs, execution_accuracy,
                                     extract_program, first_answer)
from kdistill.errors import DataError


# ---------------------------------------------------------------- the problems


def test_generator_is_deterministic_and_seeded():
    a, b = generate_problems(200, seed=0), generate_problems.__wrapped__(200, seed=0)
    assert a == b and len({r["id"] for r in a}) == 200
    assert [r["problem"] for r in generate_problems(50, seed=1)] != [r["problem"] for r in a[:50]]
    assert {r["template"] for r in a} == set(TEMPLATES) and len(TEMPLATES) >= 6
    assert all(r["synthetic"] and isinstance(r["answer"], int) for r in a)


def test_splits_are_disjoint_by_id_and_stable():
    splits = {s: problem_records(s) for s in ("train", "eval", "test")}
    ids = {s: {r["id"] for r in records} for s, records in splits.items()}
    assert not ids["train"] & ids["eval"] and not ids["train"] & ids["test"] and not ids["eval"] & ids["test"]
    assert sum(map(len, ids.values())) == word_problems.DEFAULT_COUNT
    assert len(ids["test"]) > 150 and len(ids["train"]) > 3000
    # stable: another process (another hash seed) draws the same test problems
    script = ("import json, sys; from kdistill.api.word_problems import problem_records; "
              "json.dump([r['problem'] for r in problem_records('test')], sys.stdout)")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert json.loads(fresh.stdout) == [r["problem"] for r in splits["test"]]


def test_every_reference_program_prints_its_answer():
    # in-process for all of them (our own template code), and in the sandbox for a sample of each template
    for record in generate_problems():
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(record["program"], {})  # noqa: S102 - the templates' own programs
        assert out.getvalue().strip() == str(record["answer"]), record
    sample = {}
    for record in generate_problems():
        sample.setdefault(record["template"], []).append(record)
    chosen = [r for records in sample.values() for r in records[:2]]
    checks = check_programs([r["program"] for r in chosen], [r["answer"] for r in chosen], workers=2)
    assert all(c.correct for c in checks), [(c.verdict, c.reason) for c in checks]


def test_corpora_and_texts():
    from kdistill.data.corpora import load_corpus

    program = load_corpus("arithmetic-problems", "test")[0]
    assert program["text"] == program["prompt"] + program["program"]
    assert program["prompt"] == f"problem: {program['problem']}\nprogram:\n" and program["reference"] == program["program"]
    answer = load_corpus("arithmetic-answers", "test")[0]
    assert answer["id"] == program["id"] and answer["text"] == f"problem: {program['problem']}\nanswer: {program['answer']}"
    assert answer["prompt"] == f"problem: {program['problem']}\nanswer:" and answer["reference"] == str(program["answer"])


def test_real_problem_files(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text('{"question": "2 apples and 3 more?", "final": 5}\n\n{"question": "7 minus 2?", "final": 5, "id": "q2"}\n')
    records = read_problem_file(path, problem="question", answer="final")
    assert [r["id"] for r in records] == ["gsm-1", "q2"] and records[0]["prompt"] == "problem: 2 apples and 3 more?\nprogram:\n"
    path.write_text('{"question": "no answer here"}\n')
    with pytest.raises(DataError, match=r"line 1 has no final field"):
        read_problem_file(path, problem="question", answer="final")


# ---------------------------------------------------------------- checking programs and answers


def test_answers_match_and_extraction_by_hand():
    assert answers_match("12\n", 12) and answers_match("12.0", 12) and answers_match("working: 3\n12", "12")
    assert not answers_match("13", 12) and not answers_match("", 12) and not answers_match("twelve", 12)
    assert answers_match("  Paris ", "paris") and answers_match("1,000", 1000)
    assert extract_program("Here you go:\n```python\nx = 1\nprint(x)\n```\nDone.") == "x = 1\nprint(x)"
    assert extract_program("x = 1\nprint(x)\n") == "x = 1\nprint(x)"
    assert first_answer(" 42 apples") == "42" and first_answer("-3") == "-3" and first_answer(" none") == "none"


@pytest.mark.parametrize("code, verdict, reason", [
    ("print(6 * 7)", "correct", "printed 42"),
    ("print(41)", "wrong_answer", "printed 41, which is not the answer"),
    ("x = 42", "no_output", "printed nothing"),
    ("", "empty", "the completion holds no program"),
    ("print(42 / 0)", "error", "ZeroDivisionError: division by zero"),
    ("while True:\n    pass", "timeout", ""),
])
def test_check_program_verdicts(code, verdict, reason):
    check = check_program(code, 42, timeout_s=1)
    assert check.verdict == verdict and reason in check.reason


def fake_generation(monkeypatch, completions):
    """execution accuracy with the model's greedy output replaced by hand-written completions"""
    monkeypatch.setattr("kdistill.eval.generation.generate",
                        lambda model, tokenizer, prompts, *a, **k: [completions[p] for p in prompts])


def test_execution_accuracy_against_hand_made_examples(monkeypatch):
    records = [{"prompt": f"p{i}", "answer": a} for i, a in enumerate([5, 42, 6, 3])]
    fake_generation(monkeypatch, {"p0": "print(2 + 3)", "p1": "```python\nprint(6 * 7)\n```", "p2": "print(7)",
                                  "p3": "print(undefined)"})
    result = execution_accuracy(None, None, records, mode="program")
    assert result["accuracy"] == 0.5 and result["n"] == 4
    assert result["by_verdict"] == {"correct": 2, "wrong_answer": 1, "error": 1}
    fake_generation(monkeypatch, {"p0": " 5", "p1": " 41", "p2": " 6 apples", "p3": ""})
    result = execution_accuracy(None, None, records, mode="answer")
    assert result["accuracy"] == 0.5 and result["by_verdict"] == {"correct": 2, "wrong_answer": 1, "no_output": 1}


# ---------------------------------------------------------------- the recipes and the comparison


@pytest.mark.parametrize("name", ["pad-teacher", "pad", "pad-unfiltered", "pad-direct"])
def test_pad_recipes_validate(name):
    recipe = load_recipe(name)
    assert recipe.stages[-1].synthesize is None and recipe.stages[-1].train.steps >= 100


def test_pad_variants_differ_only_where_they_should():
    pad, unfiltered = load_recipe("pad").dump(), load_recipe("pad-unfiltered").dump()
    assert pad["stages"][0]["synthesize"]["filter"]["type"] == "execution"
    assert unfiltered["stages"][0]["synthesize"]["filter"] == {"type": "none"}
    for recipe in (pad, unfiltered):
        recipe.pop("name"), recipe.pop("output"), recipe["stages"][0]["synthesize"].pop("filter")
    assert pad == unfiltered
    direct = load_recipe("pad-direct")
    assert direct.stages[0].train == load_recipe("pad").stages[1].train
    assert direct.stages[0].data.train.limit == load_recipe("pad").stages[0].synthesize.prompts.limit


def test_seeded_variant_keeps_the_synthesis_seed(tmp_path):
    from kdistill.api.pad import seeded

    run = seeded(load_recipe("pad"), 2, tmp_path / "seed-2", tmp_path / "gen.sqlite")
    assert run.stages[0].synthesize.sampling.seed == 0 and run.stages[0].synthesize.cache == str(tmp_path / "gen.sqlite")
    assert run.stages[1].train.seed == 2 and run.output == str(tmp_path / "seed-2")


def test_comparison_table():
    from kdistill.api.pad import render_markdown

    synthesis = {"prompts": 800, "candidates_per_prompt": 4, "candidates": 3200, "kept": 1000, "dropped": 2200,
                 "prompts_with_a_kept_candidate": 600, "dropped_by_verdict": {"wrong_answer": 1200, "duplicate": 1000}}
    results = {"seeds": 2, "teacher": {"accuracy": 0.4}, "variants": {
        "pad": {"runs": [{"accuracy": 0.5, "n": 192}, {"accuracy": 0.6, "n": 192}], "mean": 0.55, "stdev": 0.0707,
                "training_rows": 1000, "synthesis": synthesis},
        "pad-direct": {"runs": [{"accuracy": 0.1, "n": 192}, {"accuracy": 0.2, "n": 192}], "mean": 0.15,
                       "stdev": 0.0707, "training_rows": 800, "synthesis": None}}}
    table = render_markdown(results)
    assert "| pad: programs kept by the execution filter | 1,000 | 0.500 | 0.600 | **0.550** ± 0.071 |" in table
    assert "| the pad-teacher itself (greedy) | - | 0.400 | |" in table
    assert "on 192 held-out SYNTHETIC test problems" in table
    assert "kept 1,000 (600 prompts with at least one); dropped 2,200: wrong_answer 1,200, duplicate 1,000" in table


def test_compare_pad_and_lion_refuse_a_file_output_and_a_test_limit_below_one(tmp_path):
    from kdistill.api.lion_compare import compare_lion
    from kdistill.api.pad import compare_pad
    from kdistill.errors import ConfigError

    taken = tmp_path / "train.jsonl"
    taken.write_text("{}\n")
    for compare in (compare_pad, compare_lion):  # one message, not mkdir's FileExistsError traceback
        with pytest.raises(ConfigError, match=r"output .*train.jsonl is a file; choose another --output"):
            compare(seeds=1, output=taken)
        with pytest.raises(ConfigError, match=r"train.jsonl is a file, so no folder can be made there"):
            compare(seeds=1, output=taken / "sub")
    for limit in (0, -1):  # 0 scored nothing; -1 scored all but the last problem
        with pytest.raises(ConfigError, match=f"test_limit must be at least 1 .*got {limit}"):
            compare_pad(seeds=1, output=tmp_path / "out", test_limit=limit)
    assert taken.read_text() == "{}\n" and not (tmp_path / "out").exists()


def test_compare_pad_set_reaches_each_variant_and_a_bad_one_is_refused_before_training(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kdistill.api.pad import VARIANTS, variant_recipe
    from kdistill.api.variants import split_overrides
    from kdistill.cli import app
    from kdistill.errors import ConfigError

    def no_training(*args, **kwargs):
        raise AssertionError("the teacher trained before the variants' recipes were checked")

    monkeypatch.setattr("kdistill.teachers.recipe_runs.resolve_teacher", no_training)
    for bad, said in ((["pad-direct:train.steps=abc"], "variant pad-direct: "),  # the last variant: all checked first
                      (["train.steps=50"], "variant pad: --set train.steps: every stage sets its own"),
                      (["nope:train.steps=5"], "'nope' is not a variant"),
                      (["stages.1.train.seed=3"], "sets each run's output and seed itself")):
        done = CliRunner().invoke(app, ["compare-pad", "--output", str(tmp_path / "out"),
                                        *[x for item in bad for x in ("--set", item)]])
        text = " ".join((done.output + (done.stderr if done.stderr_bytes is not None else "")).split())
        assert done.exit_code == 2 and said in text and "AssertionError" not in text, text
    assert not (tmp_path / "out").exists()

    # K=V for every variant, VARIANT:K=V for one (their training stages sit at different indexes)
    assert split_overrides(["a.b=1", "pad-direct:c=x:y"], VARIANTS, "compare-pad") == {
        "pad": ["a.b=1"], "pad-unfiltered": ["a.b=1"], "pad-direct": ["a.b=1", "c=x:y"]}
    routed = split_overrides(["pad:stages.1.train.steps=7", "pad-unfiltered:stages.1.train.steps=8",
                              "pad-direct:train.steps=9"], VARIANTS, "compare-pad")
    recipes = {name: variant_recipe(name, sets) for name, sets in routed.items()}
    assert set(recipes) == set(VARIANTS)
    assert [recipes[n].stages[-1].train.steps for n in VARIANTS] == [7, 8, 9]
    with pytest.raises(ConfigError, match="variant pad-direct: "):  # pad-direct has one stage
        variant_recipe("pad-direct", ["stages.1.train.steps=7"])


def test_the_comparisons_python_overrides_are_checked_before_anything_trains(tmp_path, monkeypatch):
    """compare_pad ignored a misspelt variant in a dict (and trained), crashed on a list, and took a string's
    characters for assignments; compare_lion took no VARIANT: prefix and showed its own seed settings as the user's."""
    from kdistill.api.lion_compare import compare_lion
    from kdistill.api.pad import compare_pad
    from kdistill.errors import ConfigError

    def no_training(*args, **kwargs):
        raise AssertionError("something trained before the overrides were checked")

    monkeypatch.setattr("kdistill.teachers.recipe_runs.resolve_teacher", no_training)
    monkeypatch.setattr("kdistill.engine.run.run_recipe", no_training)
    cases = [(compare_pad, {"padd": ["train.steps=1"]}, "'padd' is not a variant of compare-pad"),
             (compare_pad, ["train.stepz=2"], r"variant pad: [\s\S]*train.stepz: unknown field"),
             (compare_pad, {"pad": "stages.1.train.steps=2"}, "a list of 'KEY=VALUE' strings"),
             (compare_lion, "lion.rounds=0", "a list of 'KEY=VALUE' strings"),
             (compare_lion, ["lion:lion.roundz=1"], r"variant lion: [\s\S]*lion.roundz: unknown field"),
             (compare_lion, ["nope:lion.rounds=1"], "'nope' is not a variant of compare-lion"),
             (compare_lion, ["lion.seed=3"], "compare-lion sets each run's output, seed and answer cache itself")]
    for compare, overrides, said in cases:
        with pytest.raises(ConfigError, match=said) as err:
            compare(output=tmp_path / "out", overrides=overrides)
        assert "train.seed=0" not in str(err.value)  # what compare-lion adds is not shown as the user's
    assert not (tmp_path / "out").exists()
