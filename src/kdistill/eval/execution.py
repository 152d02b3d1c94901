"""Execution accuracy: a generated program is right when, run in the sandbox, it prints the answer.

The same check serves two places: the `execution` filter of a synthesize stage (is this teacher
program worth training on?) and the evaluation of a student (how many held-out problems does its
greedy program solve?). For students that answer directly, :func:`answer_accuracy` compares the
generated answer text instead.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

FENCED = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class ProgramCheck:
    verdict: str    # correct | wrong_answer | no_output | empty | error | timeout | memory | killed
    reason: str     # in words: what it printed and what was expected, or the error's last line
    output: str = ""

    @property
    def correct(self) -> bool:
        return self.verdict == "correct"


def extract_program(completion: str) -> str:
    """The program in a completion: the first fenced ```python block when there is one (chat teachers
    wrap code in prose), else the whole text."""
    match = FENCED.search(completion)
    return (match.group(1) if match else completion).strip("\n")


def _number(text: str) -> float | None:
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def answers_match(printed: str, expected) -> bool:
    """Printed output against the answer: numerically when both are numbers (so 12, 12.0 and 12.000
    agree), else as text with case and runs of whitespace ignored. Only the last printed line counts,
    so a program may print its working first."""
    lines = [line.strip() for line in str(printed).strip().splitlines() if line.strip()]
    if not lines:
        return False
    got, want = lines[-1], str(expected).strip()
    a, b = _number(got), _number(want)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    return " ".join(got.lower().split()) == " ".join(want.lower().split())


def check_program(code: str, expected, *, timeout_s: float = 5, memory_mb: int = 256,
                  allow_network: bool = False) -> ProgramCheck:
    """Run `code` in the sandbox (kdistill.api.sandbox) and compare what it prints with `expected`."""
    from kdistill.api.sandbox import run_program

    if not code.strip():
        return ProgramCheck("empty", "the completion holds no program")
    result = run_program(code, timeout_s=timeout_s, cpu_s=timeout_s, memory_mb=memory_mb,
                         allow_network=allow_network)
    printed = result.stdout.strip()
    shown = printed.splitlines()[-1][:80] if printed else ""
    if result.verdict != "ok":
        return ProgramCheck(result.verdict, result.detail[:300] or result.verdict, printed[:200])
    # a reason never holds the expected answer: refinement shows it to the teacher, whose retry could then print it
    if not printed:
        return ProgramCheck("no_output", "printed nothing")
    if answers_match(printed, expected):
        return ProgramCheck("correct", f"printed {shown}", printed[:200])
    return ProgramCheck("wrong_answer", f"printed {shown}, which is not the answer", printed[:200])


def check_programs(codes: Sequence[str], expected: Sequence, *, workers: int = 2, **limits) -> list[ProgramCheck]:
    """check_program over many programs, `workers` sandboxes at a time, results in order."""
    if len(codes) != len(expected):
        raise ValueError(f"{len(codes)} programs but {len(expected)} answers")
    if workers <= 1 or len(codes) <= 1:
        return [check_program(c, e, **limits) for c, e in zip(codes, expected)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda pair: check_program(pair[0], pair[1], **limits), zip(codes, expected)))


def first_answer(text: str) -> str:
    """What a direct-answer model answered: its first number, else its first line."""
    match = NUMBER.search(text)
    if match:
        return match.group(0)
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


def _summary(verdicts: list[str], examples: list[dict]) -> dict:
    n = len(verdicts)
    return {"accuracy": sum(v == "correct" for v in verdicts) / max(1, n), "n": n,
            "by_verdict": dict(Counter(verdicts).most_common()), "examples": examples[:5]}


def program_accuracy(model, tokenizer, records: Sequence[dict], *, max_new_tokens: int = 96, batch_size: int = 32,
                     workers: int = 2, answer_field: str = "answer", **limits) -> dict:
    """Greedy programs for each record's `prompt`, run in the sandbox: the fraction that print the answer,
    with counts by verdict and a few examples."""
    from kdistill.eval.generation import generate

    records = list(records)
    completions = generate(model, tokenizer, [r["prompt"] for r in records], max_new_tokens, batch_size)
    programs = [extract_program(c) for c in completions]
    checks = check_programs(programs, [r[answer_field] for r in records], workers=workers, **limits)
    examples = [{"prompt": r["prompt"], "program": p, "verdict": c.verdict, "reason": c.reason}
                for r, p, c in zip(records, programs, checks)]
    return _summary([c.verdict for c in checks], examples)


def answer_accuracy(model, tokenizer, records: Sequence[dict], *, max_new_tokens: int = 8, batch_size: int = 32,
                    answer_field: str = "answer") -> dict:
    """Greedy direct answers for each record's `prompt`: the fraction whose first number is the answer."""
    from kdistill.eval.generation import generate

    records = list(records)
    completions = generate(model, tokenizer, [r["prompt"] for r in records], max_new_tokens, batch_size)
    verdicts, examples = [], []
    for record, completion in zip(records, completions):
        answered = first_answer(completion)
        verdict = "correct" if answers_match(answered, record[answer_field]) else (
            "wrong_answer" if answered else "no_output")
        verdicts.append(verdict)
        examples.append({"prompt": record["prompt"], "answer": answered, "verdict": verdict})
    return _summary(verdicts, examples)


def execution_accuracy(model, tokenizer, records: Sequence[dict], mode: str = "program", **kwargs) -> dict:
    """`mode: program` runs the generated program (PaD students); `mode: answer` reads the answer text
    (students trained to answer directly)."""
    if mode == "program":
        return program_accuracy(model, tokenizer, records, **kwargs)
    if mode == "answer":
        return answer_accuracy(model, tokenizer, records, **kwargs)
    raise ValueError(f"unknown mode {mode!r}; valid: program, answer")
