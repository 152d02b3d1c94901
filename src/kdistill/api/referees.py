"""Lion's referees: compare the teacher's and the student's answer to an instruction and call it hard or easy.

A referee is a class registered by the name a recipe uses (`lion.referee.type`), with a pydantic `Params`
model and `judge(pairs)`, which returns one :class:`Verdict` per pair, in order. A verdict with
``hard=None`` is a failure for that instruction (the judge's service failed, or its answer could not be
read): it is recorded with its reason and the instruction counts as neither hard nor easy; the run goes on.

- `rouge` (local teachers, no calls): hard when ROUGE-L(student answer, teacher answer) < `threshold`.
- `llm_judge` (hosted teachers): a chat model scores both answers from 1 to 10, in both orders to cancel
  its position bias (as Lion does); hard when teacher score − student score ≥ `gap` (Lion: 1).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator

from kdistill.config import Strict
from kdistill.config_api import APITeacher, only_fields

from kdistill.registry import Registry

REFEREES: Registry[type] = Registry("referee")


@dataclass(frozen=True)
class Pair:
    instruction: str
    teacher: str
    student: str


@dataclass(frozen=True)
class Verdict:
    hard: bool | None      # None: the referee failed on this one (neither hard nor easy)
    score: float | None    # rouge: ROUGE-L; llm_judge: teacher score − student score
    reason: str = ""
    raw: str | None = None  # what a judge answered, for the record


class RefereeParams(Strict):
    type: str


def make_referee(params, teacher_api=None, cache_path=None, where: str = "lion.referee"):
    return REFEREES.get(params.type, f"{where}.type")(params, teacher_api=teacher_api, cache_path=cache_path,
                                                      where=where)


@REFEREES.register("rouge")
class RougeReferee:
    class Params(RefereeParams):
        type: Literal["rouge"] = "rouge"
        threshold: float = Field(0.5, ge=0, le=1, description="hard when ROUGE-L(student, teacher) is below this")

    requests_per_pair = 0  # no service is asked

    def __init__(self, params, teacher_api=None, cache_path=None, where: str = "lion.referee"):
        self.params = params

    def judge(self, pairs: list[Pair]) -> list[Verdict]:
        from kdistill.eval.generation import rouge_l

        out = []
        for pair in pairs:
            score = rouge_l(pair.student, pair.teacher)
            hard = score < self.params.threshold
            out.append(Verdict(hard, score, f"ROUGE-L {score:.3f} {'<' if hard else '>='} {self.params.threshold:g}"))
        return out

    def close(self) -> None:
        pass


JUDGE_SYSTEM = "You are an impartial, careful judge of how good answers are."
JUDGE_TEMPLATE = """[Instruction]
{instruction}

[Assistant 1's answer]
{answer_1}
[End of Assistant 1's answer]

[Assistant 2's answer]
{answer_2}
[End of Assistant 2's answer]

Rate how helpful, relevant, accurate and detailed each answer is, from 1 to 10 (higher is better). The order
of the answers must not affect your ratings. Explain briefly, then end with exactly two lines:
Assistant 1: <score>
Assistant 2: <score>"""

NUMBER = r"(\d+(?:\.\d+)?)"
LABELLED = re.compile(rf"(?im)^[^\n]*?assistant\s*([12])\b[^\n\d]*[:=]\s*{NUMBER}\s*(?:/\s*10)?\s*\W*$")
BARE_PAIR = re.compile(rf"^\s*{NUMBER}\s*[,;/ ]\s*{NUMBER}\s*$")


def parse_scores(text: str) -> tuple[float, float] | None:
    """(score of assistant 1, score of assistant 2) from a judge's answer, or None when it has none.

    Reads the last "Assistant N: <score>" line for each (also "Score of Assistant 1 = 7/10"), else a last
    line of two bare numbers ("8 6"). Scores outside 0..10 count as unreadable."""
    found = {}
    for label, value in LABELLED.findall(text or ""):
        found[label] = float(value)
    if set(found) != {"1", "2"}:
        lines = [line for line in (text or "").strip().splitlines() if line.strip()]
        match = BARE_PAIR.match(lines[-1]) if lines else None
        if match is None:
            return None
        found = {"1": float(match.group(1)), "2": float(match.group(2))}
    scores = (found["1"], found["2"])
    return scores if all(0 <= s <= 10 for s in scores) else None


@REFEREES.register("llm_judge")
class LLMJudge:
    """A chat model as the referee (Lion's): teacher and student answers scored 1-10, in both orders."""

    class Params(RefereeParams):
        type: Literal["llm_judge"] = "llm_judge"
        api: APITeacher | None = Field(None, description="the judge service {base_url, model, ...} "
                                       "(default: lion.teacher.api)")
        gap: float = Field(1.0, ge=0, description="hard when teacher score − student score is at least this")
        both_orders: bool = Field(True, description="ask with the teacher's answer first and second, average")
        system: str = JUDGE_SYSTEM
        template: str = Field(JUDGE_TEMPLATE, description="the judge's prompt: {instruction}, {answer_1}, {answer_2}")
        max_tokens: int = Field(512, ge=1)
        temperature: float = Field(0.0, ge=0, le=2)

        _fields = field_validator("template")(lambda value: only_fields(value, ("instruction", "answer_1", "answer_2")))

    def __init__(self, params, teacher_api=None, cache_path=None, where: str = "lion.referee", client=None):
        self.params = params
        self.requests_per_pair = 2 if params.both_orders else 1
        self.client, self.owns_client = client, client is None  # an injected client (a test's) is the caller's
        if client is None:
            from kdistill.api.client import TeacherAPI

            self.client = TeacherAPI.for_part(params.api, teacher_api, cache_path, where, "llm_judge")

    def request(self, pair: Pair, teacher_first: bool) -> dict:
        first, second = (pair.teacher, pair.student) if teacher_first else (pair.student, pair.teacher)
        content = self.params.template.format(instruction=pair.instruction, answer_1=first, answer_2=second)
        return {"messages": [{"role": "system", "content": self.params.system}, {"role": "user", "content": content}],
                "max_tokens": self.params.max_tokens, "temperature": self.params.temperature}

    def judge(self, pairs: list[Pair]) -> list[Verdict]:
        orders = (True, False) if self.params.both_orders else (True,)
        requests = [self.request(pair, order) for pair in pairs for order in orders]
        answers = self.client.map(requests, progress=False)
        out = []
        for i in range(len(pairs)):
            teacher, student, raws, problem = [], [], [], None
            for j, teacher_first in enumerate(orders):
                answer = answers[i * len(orders) + j]
                if not answer.ok:
                    problem = f"judge request failed: {answer.error}"
                    break
                raws.append(answer.text)
                scores = parse_scores(answer.text)
                if scores is None:
                    problem = f"unreadable judgement (no two scores from 0 to 10): {answer.text.strip()[:200]!r}"
                    break
                teacher.append(scores[0] if teacher_first else scores[1])
                student.append(scores[1] if teacher_first else scores[0])
            raw = "\n---\n".join(raws) or None
            if problem is not None:
                out.append(Verdict(None, None, problem, raw))
                continue
            gap = sum(teacher) / len(teacher) - sum(student) / len(student)
            hard = gap >= self.params.gap
            out.append(Verdict(hard, gap, f"teacher {sum(teacher) / len(teacher):g} vs student "
                                          f"{sum(student) / len(student):g}: gap {gap:g} {'>=' if hard else '<'} "
                                          f"{self.params.gap:g}", raw))
        return out

    def close(self) -> None:
        if self.owns_client:
            self.client.close()
