"""Filters of a synthesize stage: each candidate is kept or dropped, with a verdict and a reason.

A filter is a class registered by the name a recipe uses (`synthesize.filter.type`), with a pydantic
`Params` model (so a typo in any field is caught before anything runs) and `judge(candidates)`, which
returns one :class:`Judgement` per candidate, in order. Candidates of a batch are judged together, so
a filter can run them in parallel (execution) or batch them through a model (a referee).

- `none`: keep everything (the unfiltered baseline).
- `execution`: run the completion as a program in the sandbox; keep it when it prints the record's
  answer (PaD). `refine` gives a failed program one more try with the error in the prompt.
- `threshold`: keep candidates whose score is within [min, max]; scores are registered in SCORERS
  (the teacher's own mean token log-probability, length, ROUGE-L against a record field). A
  model-based referee (CapFilt's image-text matching head) is one more scorer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kdistill.errors import DataError, did_you_mean
from kdistill.registry import Registry

FILTERS: Registry[type] = Registry("filter")
SCORERS: Registry[Callable] = Registry("scorer")


@dataclass(frozen=True)
class Candidate:
    record: dict                      # the prompt's source record (its answer, reference, ...)
    prompt: str                       # the text the generator continued
    completion: str
    mean_logprob: float | None = None  # the generator's mean log p per generated token, when known


@dataclass(frozen=True)
class Judgement:
    kept: bool
    verdict: str
    reason: str = ""
    score: float | None = None


class FilterParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str


DEFAULT_REFINE = ("{prompt}{completion}\n# that program is wrong: {reason}\n# a corrected program:\n"
                  "{template_prompt}")


class Refine(BaseModel):
    """One more try for a failed candidate: the generator continues this prompt (format fields: prompt,
    completion, reason, template_prompt = the original prompt again, and the record's fields)."""
    model_config = ConfigDict(extra="forbid")
    template: str = DEFAULT_REFINE


@FILTERS.register("none")
class KeepAll:
    class Params(FilterParams):
        type: Literal["none"] = "none"

    needs_logprobs = False
    refine = None

    def __init__(self, params, where: str = "synthesize.filter"):
        self.params = params

    def judge(self, candidates: list[Candidate]) -> list[Judgement]:
        return [Judgement(True, "unchecked", "filter: none keeps every candidate") for _ in candidates]


@FILTERS.register("execution")
class ExecutionFilter:
    """PaD's filter: the program must run and print the record's answer."""

    class Params(FilterParams):
        type: Literal["execution"] = "execution"
        answer: str = Field("answer", description="the record field holding the expected answer")
        timeout_s: float = Field(5, gt=0, description="wall clock and CPU seconds per program")
        memory_mb: int = Field(256, ge=16)
        workers: int = Field(2, ge=1, description="programs run at once")
        refine: Refine | None = Field(None, description="true or {template}: feed the error back once")
        allow_network: bool = Field(False, description="the sandbox's opt-out where namespaces are unavailable "
                                    "(then programs are NOT isolated from the network and filesystem)")

        @field_validator("refine", mode="before")
        @classmethod
        def refine_flag(cls, value):
            return {} if value is True else None if value is False else value

    needs_logprobs = False

    def __init__(self, params, where: str = "synthesize.filter"):
        from kdistill.api.sandbox import isolation_problem

        problem = isolation_problem()
        if problem and not params.allow_network:
            from kdistill.api.sandbox import SandboxUnavailable

            raise SandboxUnavailable(f"{where}: the execution filter runs teacher programs in the sandbox, which "
                                     f"cannot isolate them here: {problem}. Enable user namespaces (or run as "
                                     f"root), or set {where}.allow_network: true to run them unisolated")
        self.params, self.where = params, where
        self.refine = params.refine

    def judge(self, candidates: list[Candidate]) -> list[Judgement]:
        from kdistill.eval.execution import check_programs, extract_program

        answers = []
        for c in candidates:
            if self.params.answer not in c.record:
                raise DataError(f"{self.where}.answer: the prompt records have no {self.params.answer!r} field "
                                f"(fields: {', '.join(sorted(c.record))}); name the field with the expected answer")
            answers.append(c.record[self.params.answer])
        checks = check_programs([extract_program(c.completion) for c in candidates], answers,
                                workers=self.params.workers, timeout_s=self.params.timeout_s,
                                memory_mb=self.params.memory_mb, allow_network=self.params.allow_network)
        return [Judgement(check.correct, check.verdict, check.reason) for check in checks]


@FILTERS.register("threshold")
class ThresholdFilter:
    """Keep a candidate when min <= score <= max (either bound may be left out)."""

    class Params(FilterParams):
        type: Literal["threshold"] = "threshold"
        score: str = Field("mean_logprob", description="a registered scorer: " + ", ".join(
            ("mean_logprob", "length", "rouge_l")))
        min: float | None = None
        max: float | None = None
        reference: str = Field("reference", description="rouge_l: the record field to compare with")

        # checked when the recipe is read, not when the filter first runs after the candidates were generated
        @field_validator("score")
        @classmethod
        def a_registered_scorer(cls, value):
            if value not in SCORERS.names():
                raise ValueError(f"unknown scorer {value!r}" + did_you_mean(value, SCORERS.names())
                                 + f"; valid: {', '.join(SCORERS.names())}")
            return value

        @model_validator(mode="after")
        def a_bound(self):
            if self.min is None and self.max is None:
                raise ValueError("a threshold filter needs min, max or both (without either it keeps everything)")
            return self

    refine = None

    def __init__(self, params, where: str = "synthesize.filter"):
        self.params, self.where = params, where
        self.scorer = SCORERS.get(params.score, f"{where}.score")
        self.needs_logprobs = params.score == "mean_logprob"

    def judge(self, candidates: list[Candidate]) -> list[Judgement]:
        out = []
        for c in candidates:
            value = self.scorer(c, self.params)
            if value is None:
                out.append(Judgement(False, "unscored", f"{self.params.score} is not available for this candidate"))
            elif self.params.min is not None and value < self.params.min:
                out.append(Judgement(False, "below_min", f"{self.params.score} {value:.4g} < {self.params.min:g}", value))
            elif self.params.max is not None and value > self.params.max:
                out.append(Judgement(False, "above_max", f"{self.params.score} {value:.4g} > {self.params.max:g}", value))
            else:
                out.append(Judgement(True, "passed", f"{self.params.score} {value:.4g}", value))
        return out


@SCORERS.register("mean_logprob")
def mean_logprob(candidate: Candidate, params) -> float | None:
    """The generator's own confidence: mean log p of its tokens (before temperature)."""
    return candidate.mean_logprob


@SCORERS.register("length")
def length(candidate: Candidate, params) -> float:
    """Words in the completion."""
    return float(len(candidate.completion.split()))


@SCORERS.register("rouge_l")
def rouge_l_score(candidate: Candidate, params) -> float:
    """ROUGE-L F1 of the completion against the record's `reference` field."""
    from kdistill.eval.generation import rouge_l

    if params.reference not in candidate.record:
        raise DataError(f"synthesize.filter.reference: the prompt records have no {params.reference!r} field")
    return rouge_l(candidate.completion, str(candidate.record[params.reference]))


def make_filter(params, where: str = "synthesize.filter"):
    return FILTERS.get(params.type, f"{where}.type")(params, where)
