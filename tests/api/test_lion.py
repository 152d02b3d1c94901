"""Lion's loop on tiny models: rounds, resume after a kill, the referees, the writers and the schema."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdistill.api.client import Choice, Completion, Failure
from kdistill.api.generators import Sample
from kdistill.api.instruction_writers import TeacherWriter, WriteContext, clean_instruction, plan
from kdistill.api.lion import run_lion
from kdistill.api.referees import LLMJudge, Pair, RougeReferee, Verdict, parse_scores
from kdistill.config import load_recipe
from kdistill.engine.loop import StageTrainer
from kdistill.errors import CheckpointError, ConfigError

WORDNET = os.path.exists("/usr/share/wordnet/data.noun")
needs_wordnet = pytest.mark.skipif(not WORDNET, reason="wordnet-base not installed")


class StubTeacher:
    """Answers every prompt with words of the prompt; counts the prompts it was asked."""

    id = "stub-teacher"

    def __init__(self):
        self.asked = 0

    def check(self):
        pass

    def close(self):
        pass

    def sample(self, prompts, seeds, n, sampling, logprobs=False):
        self.asked += len(prompts)
        return [[Sample(" a thing called " + p.split(":")[1].split("(")[0].strip(), "stop")] * n for p in prompts]


class StubReferee:
    """Hard when the instruction's word has an even length; the word 'broken' is a judge failure."""

    requests_per_pair = 0

    def judge(self, pairs):
        out = []
        for pair in pairs:
            word = pair.instruction.split(":")[1].split("(")[0].strip()
            out.append(Verdict(None, None, "judge failed") if word == "broken" else Verdict(len(word) % 2 == 0, 0.0))
        return out

    def close(self):
        pass


class StubWriter:
    """New instructions named after the round and the example they are modelled on."""

    requests_per_slot = 0

    def __init__(self):
        self.calls = []

    def write(self, hard, easy, n_hard, n_easy, taken, context):
        import random

        self.calls.append(([h["id"] for h in hard], [e["id"] for e in easy]))
        written = []
        for i, (kind, example) in enumerate(plan(hard, easy, n_hard, n_easy, random.Random(context.seed))):
            word = f"w{context.seed % 997}x{i}{'a' * (i % 2)}"  # from the round's seed: the same after a resume
            written.append({"id": word, "prompt": f"word: {word} (noun)\ndefinition:", "origin": kind,
                            "parent": example["id"]})
        return written, []

    def close(self):
        pass


@pytest.fixture
def seeds(tmp_path):
    words = ["cat", "dogs", "bird", "broken", "horse", "mouse"]
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"word: {w} (noun)\ndefinition:",
                                        "reference": f"a small {w}"}) + "\n" for i, w in enumerate(words)))
    return path


def lion_stage(tiny_gpt2_dir, seeds, tmp_path, **lion):
    recipe = load_recipe({
        "name": "tiny-lion",
        "teacher": {"model": tiny_gpt2_dir, "task": "causal-lm"},
        "student": {"from_teacher": {"layers": [2]}},
        "data": {"train": {"path": str(seeds)}, "max_length": 32},
        "losses": [{"type": "cross_entropy"}],
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "warmup": 0.0, "save_every": 1, "log_every": 1},
        "lion": {"rounds": 3, "new_instructions": 4, "hard_share": 0.5, "answers": {"max_new_tokens": 4},
                 "eval": {"path": str(seeds)}, "eval_limit": 3, "batch_size": 4, **lion},
        "output": str(tmp_path / "run"),
    })
    return recipe.stages[0]


def run(stage, out, teacher, writer, resume=False):
    return run_lion(stage, out / "stages" / "main", out, resume=resume, answerer=teacher, referee=StubReferee(),
                    writer=writer, progress=False)


def test_rounds_grow_the_pool_from_hard_and_easy_instructions(tiny_gpt2_dir, seeds, tmp_path):
    stage, out, teacher, writer = lion_stage(tiny_gpt2_dir, seeds, tmp_path), tmp_path / "run", StubTeacher(), StubWriter()
    last = run(stage, out, teacher, writer)
    root = out / "stages" / "main"
    assert last == root / "round-03" / "student" and (last / "model.safetensors").exists()
    summary = json.loads((root / "summary.json").read_text())
    assert summary["complete"] and [r["pool"] for r in summary["rounds"]] == [6, 10, 14]
    assert [r["trained_on"] for r in summary["rounds"]] == [6, 10, 14]  # train_on: pool, every answer so far
    assert teacher.asked == summary["teacher_answers"] == 14  # each instruction answered once
    first = summary["rounds"][0]
    # dogs, bird, horse (even length) are hard; cat, mouse easy; 'broken' is a referee failure, neither
    assert (first["hard"], first["easy"], first["referee_failures"]) == (2, 3, 1)
    hard, easy = writer.calls[0]
    assert sorted(hard) == ["s1", "s2"] and sorted(easy) == ["s0", "s4", "s5"]
    judged = [json.loads(line) for line in (root / "round-01" / "judgements.jsonl").read_text().splitlines()]
    assert [j["reason"] for j in judged if j["hard"] is None] == ["judge failed"]
    new = [json.loads(line) for line in (root / "round-01" / "new.jsonl").read_text().splitlines()]
    assert [n["origin"] for n in new] == ["hard", "hard", "easy", "easy"]
    assert all(n["parent"] in (hard if n["origin"] == "hard" else easy) for n in new)
    pool = [json.loads(line) for line in (root / "round-03" / "pool.jsonl").read_text().splitlines()]
    assert [p["round"] for p in pool] == [1] * 6 + [2] * 4 + [3] * 4
    scores = [json.loads((root / f"round-{r:02d}" / "eval.json").read_text())["rouge_l"] for r in range(4)]
    assert all(0 <= s <= 1 for s in scores) and summary["eval_before"] == scores[0]
    assert not (root / "round-03" / "judgements.jsonl").exists()  # the last round only trains and scores


def test_a_referee_that_judges_nothing_stops_the_round_with_its_reason(tiny_gpt2_dir, seeds, tmp_path):
    from kdistill.errors import DataError

    class FailingReferee(StubReferee):  # e.g. an llm_judge whose every answer is unreadable (HTTP 200 each time)
        def judge(self, pairs):
            return [Verdict(None, None, "no score in the judge's answer") for _ in pairs]

    stage, out = lion_stage(tiny_gpt2_dir, seeds, tmp_path), tmp_path / "run"
    with pytest.raises(DataError, match=r"lion.referee judged none of round 1's 6 pairs \(e.g. .no score in the "
                                        r"judge's answer.\).*--resume"):  # it spun for ever, writing from nothing
        run_lion(stage, out / "stages" / "main", out, answerer=StubTeacher(), referee=FailingReferee(),
                 writer=StubWriter(), progress=False)
    assert not (out / "stages" / "main" / "round-01" / "judgements.jsonl").exists()  # judged again on resume
    with pytest.raises(ValueError, match="no judged instruction"):
        plan([], [], 1, 1, __import__("random").Random(0))


def test_a_killed_run_resumes_at_the_right_round_without_asking_the_teacher_again(tiny_gpt2_dir, seeds, tmp_path,
                                                                                   monkeypatch):
    stage = lion_stage(tiny_gpt2_dir, seeds, tmp_path)
    whole = tmp_path / "whole"
    run(stage, whole, StubTeacher(), StubWriter())

    original = StageTrainer.train_step

    def dies(self, step):
        if self.stage.name == "main-round-02" and step == 2:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(StageTrainer, "train_step", dies)
    out, first = tmp_path / "killed", StubTeacher()
    with pytest.raises(KeyboardInterrupt):
        run(stage, out, first, StubWriter())
    root = out / "stages" / "main"
    assert (root / "round-01" / "done.json").exists() and (root / "round-02" / "answers.jsonl").exists()
    assert not (root / "round-02" / "done.json").exists() and first.asked == 10
    monkeypatch.setattr(StageTrainer, "train_step", original)

    with pytest.raises(CheckpointError, match="already holds Lion rounds"):
        run(stage, out, StubTeacher(), StubWriter())
    again, writer = StubTeacher(), StubWriter()
    monkeypatch.chdir(tmp_path)  # resumed through a relative spelling of the folder an absolute one started
    run(stage, Path("killed"), again, writer, resume=True)
    assert again.asked == 4  # only round 3's new instructions: rounds 1 and 2 were answered before the kill
    assert len(writer.calls) == 1  # round 1's instructions were written before the kill, round 2's now
    summary = json.loads((root / "summary.json").read_text())
    assert summary["complete"] and summary["teacher_answers"] == 14
    resumed = load_file(str(root / "round-03" / "student" / "model.safetensors"))
    uninterrupted = load_file(str(whole / "stages" / "main" / "round-03" / "student" / "model.safetensors"))
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)  # the same student, bit for bit


def test_teacher_answers_that_failed_stop_the_round_and_are_asked_again_on_resume(tiny_gpt2_dir, seeds, tmp_path):
    from kdistill.errors import DataError

    class FlakyTeacher(StubTeacher):  # 'horse' and 'mouse' fail their retries once (a 503 burst), then answer
        def __init__(self, failing=("horse", "mouse")):
            super().__init__()
            self.failing, self.prompts = set(failing), []

        def sample(self, prompts, seeds, n, sampling, logprobs=False):
            self.prompts += prompts
            out = super().sample(prompts, seeds, n, sampling, logprobs)
            return [[Sample("", None, error="HTTP 503")] if any(w in p for w in self.failing) else s
                    for p, s in zip(prompts, out)]

    stage, out = lion_stage(tiny_gpt2_dir, seeds, tmp_path), tmp_path / "run"
    with pytest.raises(DataError, match=r"lion.teacher: 2 of round 1's 6 answers failed \(first: HTTP 503\); the 4 "
                                        r"that came back are kept: run again with --resume"):
        run(stage, out, FlakyTeacher(), StubWriter())  # before: trained on 4, and the 2 lost to every later round
    round_1 = out / "stages" / "main" / "round-01"
    assert not (round_1 / "answers.jsonl").exists() and len(read_rows(round_1 / "answers.partial.jsonl")) == 4
    again = FlakyTeacher(failing=())
    run(stage, out, again, StubWriter(), resume=True)
    assert sorted(p.split(":")[1].split("(")[0].strip() for p in again.prompts[:2]) == ["horse", "mouse"]
    answers = read_rows(round_1 / "answers.jsonl")
    assert len(answers) == 6 and all(a["error"] is None for a in answers)
    assert not (round_1 / "answers.partial.jsonl").exists()


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_wordnet
# train_on: new with 2 new instructions trains round 2 on 2 rows under batch_size 4: generated data is trained on,
# not refused as a batch twice the data (the run's teacher answers are already paid for)
@pytest.mark.parametrize("train_on", ["pool", "new"])
def test_a_recipe_with_a_lion_stage_runs_with_the_local_teacher_and_ends_in_a_student(tiny_gpt2_dir, seeds, tmp_path,
                                                                                      train_on):
    from kdistill import distill

    raw = {"name": "tiny-lion", "teacher": {"model": tiny_gpt2_dir, "task": "causal-lm"},
           "student": {"from_teacher": {"layers": [2]}},
           "data": {"train": {"path": str(seeds)}, "max_length": 32}, "losses": [{"type": "cross_entropy"}],
           "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "warmup": 0.0},
           "lion": {"rounds": 2, "new_instructions": 2, "answers": {"max_new_tokens": 4}, "train_on": train_on,
                    "referee": {"type": "rouge", "threshold": 0.5},
                    "writer": {"type": "wordnet-random"}},
           "output": str(tmp_path / "run")}
    student = distill(raw, progress=False)
    meta = json.loads((student / "kdistill.json").read_text())
    assert meta["lion"]["complete"] and meta["lion"]["rounds_done"] == 2 and meta["stage"] == "main"
    cache = tmp_path / "run" / "stages" / "main" / "teacher.sqlite"
    assert cache.exists()  # the local teacher's answers, so a resumed run does not generate them again
    assert distill(raw, progress=False, resume=True) == student  # finished: nothing runs again


# ---------------------------------------------------------------- referees


def test_the_rouge_referee_marks_hard_below_the_threshold():
    referee = RougeReferee(RougeReferee.Params(threshold=0.5))
    verdicts = referee.judge([Pair("q", "a small domestic cat", "a small domestic cat"),
                              Pair("q", "a small domestic cat", "an engine part"),
                              Pair("q", "one two three four", "one two")])  # ROUGE-L exactly 2/3
    assert [v.hard for v in verdicts] == [False, True, False]
    assert verdicts[0].score == 1.0 and verdicts[1].score == 0.0 and "< 0.5" in verdicts[1].reason
    assert RougeReferee(RougeReferee.Params(threshold=0.7)).judge([Pair("q", "one two three four", "one two")])[0].hard


@pytest.mark.parametrize("text, scores", [
    ("Good and bad.\nAssistant 1: 8\nAssistant 2: 6", (8, 6)),
    ("Evaluation evidence: ...\nScore of the Assistant 1: 7.5\nScore of the Assistant 2: 9", (7.5, 9)),
    ("Assistant 1's answer is better than Assistant 2.\nAssistant 1: 9/10\nAssistant 2: 3/10.", (9, 3)),
    ("reasons\n8 6", (8, 6)),
    ("Assistant 1 is better.", None),
    ("Assistant 1: 12\nAssistant 2: 3", None),
    ("", None),
    ("\x00\x01 garbage ]]]", None),
])
def test_judge_scores_are_read_robustly(text, scores):
    assert parse_scores(text) == scores


class StubChat:
    """A chat client: answers from a list, in order; records the requests."""

    def __init__(self, answers):
        self.answers, self.requests = list(answers), []

    def map(self, requests, progress=True):
        self.requests += requests
        out = []
        for request in requests:
            text = self.answers.pop(0)
            out.append(Failure("k", text[5:], 503) if text.startswith("FAIL:") else
                       Completion("k", [Choice(text, "stop")]))
        return out

    def close(self):
        pass


def test_the_llm_judge_averages_both_orders_and_records_garbage_as_a_failure():
    chat = StubChat(["Assistant 1: 9\nAssistant 2: 4",     # teacher first: teacher 9, student 4
                     "Assistant 1: 5\nAssistant 2: 8",     # student first: student 5, teacher 8
                     "Assistant 1: 7\nAssistant 2: 7", "Assistant 1: 7\nAssistant 2: 6.5",
                     "I cannot decide, both are fine.", "Assistant 1: 7\nAssistant 2: 7",
                     "FAIL:HTTP 503: overloaded", "Assistant 1: 1\nAssistant 2: 2"])
    judge = LLMJudge(LLMJudge.Params(gap=1.0), client=chat)
    pairs = [Pair(f"instruction {i}", f"teacher {i}", f"student {i}") for i in range(4)]
    verdicts = judge.judge(pairs)
    assert (verdicts[0].hard, verdicts[0].score) == (True, 4.0)        # (9 + 8) / 2 − (4 + 5) / 2
    assert (verdicts[1].hard, verdicts[1].score) == (False, -0.25)     # (7 + 6.5) / 2 − (7 + 7) / 2
    assert verdicts[2].hard is None and "unreadable judgement" in verdicts[2].reason
    assert "both are fine" in verdicts[2].raw
    assert verdicts[3].hard is None and "judge request failed: HTTP 503" in verdicts[3].reason
    first, swapped = chat.requests[0]["messages"][1]["content"], chat.requests[1]["messages"][1]["content"]
    assert first.index("teacher 0") < first.index("student 0") and swapped.index("student 0") < swapped.index("teacher 0")


def test_the_llm_judge_over_a_real_server_that_writes_garbage_fails_each_item_not_the_run(tiny_gpt2_dir):
    from kdistill.api.server import TeacherServer

    with TeacherServer(tiny_gpt2_dir, port=0) as server:
        judge = LLMJudge(LLMJudge.Params(api={"base_url": server.url, "model": server.model_name}, max_tokens=6,
                                         system="judge", template="{instruction} 1: {answer_1} 2: {answer_2}"))
        verdicts = judge.judge([Pair("word: cat (noun)\ndefinition:", "a small feline", "a dog")])
        judge.close()
    assert verdicts[0].hard is None and "unreadable judgement" in verdicts[0].reason  # a random model's answer


# ---------------------------------------------------------------- writers


def test_the_teacher_writer_keeps_usable_instructions_and_records_the_rest():
    chat = StubChat(['New instruction: "Define the word otter."', "", "word: cat (noun)\ndefinition:",
                     "FAIL:connection failed"])
    writer = TeacherWriter(TeacherWriter.Params(), client=chat)
    hard = [{"id": "h", "prompt": "word: cat (noun)\ndefinition:"}]
    easy = [{"id": "e", "prompt": "word: dog (noun)\ndefinition:"}]
    taken = {"h", "e", hard[0]["prompt"], easy[0]["prompt"]}
    written, failed = writer.write(hard, easy, 2, 2, taken, WriteContext(lambda r: r["prompt"], 7))
    assert [w["prompt"] for w in written] == ["Define the word otter."] and written[0]["origin"] == "hard"
    assert [f["reason"].split(" (")[0].split(":")[0] for f in failed] == [
        "unusable instruction", "unusable instruction", "writer request failed"]
    assert "cat (noun)" in chat.requests[0]["messages"][1]["content"]
    assert clean_instruction("'Instruction: x'") == "Instruction: x" and clean_instruction("Instruction: 'x'") == "x"


@needs_wordnet
def test_wordnet_writers_stay_in_the_training_split_near_their_examples():
    from kdistill.api.instruction_writers import WordNetNeighbours, WordNetRandom
    from kdistill.api.wordnet_graph import neighbours
    from kdistill.data.corpora import wordnet_definitions

    near = WordNetNeighbours(WordNetNeighbours.Params())
    train = {r["id"]: r for r in wordnet_definitions("train")}
    dog = next(r for r in train.values() if r["prompt"].startswith("word: dog (noun)"))
    violet = next(r for r in train.values() if r["prompt"].startswith("word: violet (adjective)")) \
        if any(r["prompt"].startswith("word: violet (adjective)") for r in train.values()) else dog
    taken = {dog["id"], violet["id"]}
    written, failed = near.write([dog], [violet], 6, 2, taken, WriteContext(lambda r: r["prompt"], 0))
    held_out = {r["id"] for r in wordnet_definitions("dev")} | {r["id"] for r in wordnet_definitions("test")}
    assert len(written) == 8 and not failed and len({w["id"] for w in written}) == 8
    for w in written:
        parent = dog if w["origin"] == "hard" else violet
        assert w["id"] in train and w["id"] not in held_out and w["parent"] == parent["id"]
        assert w["id"] in neighbours(near.graph, parent["id"]) or (
            w["how"] == "lexfile" and near.graph[w["id"]].lexfile == near.graph[parent["id"]].lexfile)
        assert w["prompt"] == train[w["id"]]["prompt"]
    assert [w["origin"] for w in written].count("hard") == 6
    randoms, _ = WordNetRandom(WordNetRandom.Params()).write([], [], 2, 3, set(taken), WriteContext(lambda r: r["prompt"], 0))
    assert len(randoms) == 5 and all(r["origin"] == "random" and r["id"] in train for r in randoms)


# ---------------------------------------------------------------- schema


def base_recipe(**changes):
    raw = {"name": "x", "teacher": {"model": "recipe:lm-teacher", "task": "causal-lm"},
           "student": {"from_teacher": {"layers": "uniform", "num_layers": 2}},
           "data": {"train": {"source": "wordnet-definitions"}}, "losses": [{"type": "cross_entropy"}],
           "lion": {"rounds": 2}}
    for key, value in changes.items():
        raw[key] = value
    return raw


def test_the_lion_block_is_checked_by_field():
    recipe = load_recipe(base_recipe())
    assert recipe.stages[0].lion.referee.type == "rouge" and recipe.stages[0].lion.writer.type == "wordnet-neighbours"
    with pytest.raises(ConfigError, match=r"lion.referee.type.*did you mean 'rouge'"):
        load_recipe(base_recipe(lion={"referee": {"type": "rouje"}}))
    with pytest.raises(ConfigError, match=r"lion.writer.relation: unknown field"):
        load_recipe(base_recipe(lion={"writer": {"type": "wordnet-neighbours", "relation": ["hypernym"]}}))
    with pytest.raises(ConfigError, match=r"lion.hard_share"):
        load_recipe(base_recipe(lion={"hard_share": 2}))
    with pytest.raises(ConfigError, match="teacher.source: live"):
        load_recipe(base_recipe(teacher={"source": "cache", "path": "store", "task": "causal-lm"}))
    with pytest.raises(ConfigError, match="lion.teacher.model.*earlier stage"):
        load_recipe(base_recipe(lion={"teacher": {"model": "stage:nothing"}}))
    # a template's fields are checked when the recipe is read, not after a round of training
    with pytest.raises(ConfigError, match=r"lion.referee.template: uses \{question\}.*\{answer_2\}"):
        load_recipe(base_recipe(lion={"referee": {"type": "llm_judge", "template": "Q: {question}"}}))
    with pytest.raises(ConfigError, match=r"lion.writer.template: uses \{example\}.*\{kind\}"):
        load_recipe(base_recipe(lion={"writer": {"type": "teacher", "template": "like {example}"}}))
    # a part's service block is checked on reading too: a typo, a pasted key (never echoed, never saved), no service
    api = {"base_url": "http://127.0.0.1:1/v1", "model": "m"}
    with pytest.raises(ConfigError, match=r"lion.referee.api.modle: unknown field; did you mean 'model'"):
        load_recipe(base_recipe(lion={"referee": {"type": "llm_judge", "api": {"base_url": "http://h/v1", "modle": "m"}}}))
    with pytest.raises(ConfigError, match=r"lion.writer.api.api_key_env: .*NAME of the environment variable") as said:
        load_recipe(base_recipe(lion={"writer": {"type": "teacher", "api": {**api, "api_key_env": "sk-abc123-def"}}}))
    assert "sk-abc123" not in str(said.value)
    for part, kind in (("referee", "llm_judge"), ("writer", "teacher")):
        with pytest.raises(ConfigError, match=rf"lion.{part}.api: {kind} needs a chat service: give lion.{part}.api"):
            load_recipe(base_recipe(lion={part: {"type": kind}}))
    assert load_recipe(base_recipe(lion={"referee": {"type": "llm_judge", "api": api}})).stages[0].lion.referee.api.model == "m"


def test_the_comparison_table_has_a_row_per_round_and_the_teacher_for_scale():
    from kdistill.api.lion_compare import hard_fraction, table

    # referee failures (judged, neither hard nor easy) count in neither part of the share
    assert hard_fraction({"hard": 2, "easy": 3, "judged": 10}) == 0.4
    assert hard_fraction({"hard": 0, "easy": 0, "judged": 4}) is None

    run = {"seed": 0, "rouge_l": [0.02, 0.06, 0.09], "teacher_answers": [0, 200, 400], "hard_fraction": [0.7, None]}
    result = {"runs": {"lion": [run, {**run, "rouge_l": [0.02, 0.08, 0.11]}], "lion-random": [run]}, "seeds": 2,
              "teacher_rouge_l": 0.124, "eval_prompts": 100}
    lines = table(result).splitlines()
    assert lines[0] == "| after round | teacher answers so far | lion | lion-random |"
    assert lines[3] == "| 1 | 200 | 0.0700 ± 0.0141 | 0.0600 |" and "teacher scores 0.1240" in table(result)
