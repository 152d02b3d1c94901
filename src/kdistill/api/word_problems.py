"""SYNTHETIC arithmetic word problems, made from templates with a seed, for Program-aided Distillation.

Every problem here is written by a template in this file, not by a person and not taken from a
benchmark: the numbers are drawn from a seeded generator and the wording is fixed per template. Each
record carries its integer `answer`, a reference `program` (Python that prints the answer, checked by
the tests in the sandbox) and a stable `id` (a hash of the problem text), and the train/dev/test
split is a hash of that id, so the same problems land in the same split on every machine.

The built-in corpora `arithmetic-problems` (problem -> program) and `arithmetic-answers`
(problem -> answer) read these records; real problems come from a .jsonl file with `problem` and
`answer` fields (:func:`read_problem_file`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import random
from pathlib import Path
from typing import Callable

from kdistill.errors import DataError

PROGRAM_PROMPT = "problem: {problem}\nprogram:\n"
ANSWER_PROMPT = "problem: {problem}\nanswer:"
DEFAULT_COUNT = 4000  # problems drawn; about 90/5/5 percent of them land in train/dev/test
DEFAULT_SEED = 0

NAMES = ("Maya", "Sam", "Lena", "Omar", "Ivy", "Tom", "Ana", "Ben", "Zoe", "Ravi", "Mia", "Leo", "Nora",
         "Eli", "Sara", "Kai", "Ruth", "Finn", "Aisha", "Jon")
ITEMS = ("notebook", "pencil", "apple", "ticket", "candle", "mug", "scarf", "toy car", "lemon", "book")
EXTRAS = ("bag", "pen", "card", "bottle of water", "map")
THINGS = ("marbles", "stickers", "cookies", "shells", "cards", "grapes", "coins", "beads")
RELATIVES = ("mother", "father", "aunt", "uncle", "grandmother", "grandfather")
VEHICLES = ("train", "bus", "truck", "boat", "car")

Template = Callable[[random.Random], tuple[str, list[tuple[str, int]], str, str]]
TEMPLATES: dict[str, Template] = {}


def template(name: str):
    def add(fn: Template) -> Template:
        TEMPLATES[name] = fn
        return fn
    return add


# A template returns (problem, [(variable, given number), ...], expression over the variables, result
# variable). The program assigns the given numbers in order, computes the expression, prints it: the
# same shape for every template, so a model's errors are wrong numbers or operations, not style.


@template("shopping")
def shopping(rng: random.Random):
    name, item, extra = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(EXTRAS)
    count, price, extra_price = rng.randint(2, 9), rng.randint(2, 15), rng.randint(1, 20)
    problem = (f"{name} buys {count} {item}s at {price} dollars each and a {extra} for {extra_price} dollars. "
               f"How many dollars does {name} spend in total?")
    return problem, [("count", count), ("price", price), ("extra", extra_price)], "count * price + extra", "total"


@template("sharing")
def sharing(rng: random.Random):
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    friends, each = rng.randint(2, 9), rng.randint(2, 15)
    if rng.random() < 0.5:
        problem = (f"{name} has {friends * each} {things} and shares them equally among {friends} friends. "
                   f"How many {things} does each friend get?")
        return problem, [("things", friends * each), ("friends", friends)], "things // friends", "each"
    kept = rng.randint(1, 9)
    problem = (f"{name} has {friends * each + kept} {things}, keeps {kept} and shares the rest equally among "
               f"{friends} friends. How many {things} does each friend get?")
    return (problem, [("things", friends * each + kept), ("kept", kept), ("friends", friends)],
            "(things - kept) // friends", "each")


@template("ages")
def ages(rng: random.Random):
    name, relative = rng.choice(NAMES), rng.choice(RELATIVES)
    age, years = rng.randint(3, 12), rng.randint(2, 20)
    if rng.random() < 0.5:
        times = rng.randint(3, 6)
        problem = (f"{name} is {age} years old. {name}'s {relative} is {times} times as old. "
                   f"How old will the {relative} be in {years} years?")
        return problem, [("age", age), ("times", times), ("years", years)], "age * times + years", "answer"
    other = rng.choice([n for n in NAMES if n != name])
    gap = rng.randint(2, 15)
    years = rng.randint(1, age + gap - 1)
    problem = (f"{name} is {gap} years older than {other}, who is {age}. "
               f"How old was {name} {years} years ago?")
    return problem, [("gap", gap), ("age", age), ("years", years)], "age + gap - years", "answer"


@template("rates")
def rates(rng: random.Random):
    kind = rng.randrange(3)
    if kind == 0:
        vehicle, speed, hours = rng.choice(VEHICLES), rng.randint(3, 12) * 10, rng.randint(2, 9)
        problem = f"A {vehicle} travels at {speed} km per hour for {hours} hours. How many km does it travel?"
        return problem, [("speed", speed), ("hours", hours)], "speed * hours", "distance"
    if kind == 1:
        rate, minutes = rng.randint(2, 20), rng.randint(2, 12)
        problem = (f"A pump fills {rate} litres per minute. How many minutes does it take to fill a "
                   f"{rate * minutes} litre tank?")
        return problem, [("rate", rate), ("tank", rate * minutes)], "tank // rate", "minutes"
    name, pages, weeks = rng.choice(NAMES), rng.randint(2, 25), rng.randint(2, 6)
    problem = f"{name} reads {pages} pages a day. How many pages does {name} read in {weeks} weeks?"
    return problem, [("pages", pages), ("weeks", weeks)], "pages * 7 * weeks", "total"


@template("remainders")
def remainders(rng: random.Random):
    name, size = rng.choice(NAMES), rng.randint(3, 12)
    eggs = rng.randint(size + 1, 99)
    if rng.random() < 0.5:
        problem = f"{name} packs {eggs} eggs into boxes of {size}. How many eggs are left over?"
        return problem, [("eggs", eggs), ("size", size)], "eggs % size", "left"
    problem = f"{name} packs {eggs} eggs into boxes of {size}. How many boxes can {name} fill completely?"
    return problem, [("eggs", eggs), ("size", size)], "eggs // size", "boxes"


@template("multi-step")
def multi_step(rng: random.Random):
    if rng.random() < 0.5:
        trays, per_tray, bag = rng.randint(2, 6), rng.randint(6, 12), rng.randint(2, 6)
        bags = rng.randint(1, trays * per_tray // bag - 1)
        sold = trays * per_tray - bags * bag
        problem = (f"A baker bakes {trays} trays of {per_tray} cookies, sells {sold} of them and puts the rest "
                   f"into bags of {bag}. How many bags does the baker fill?")
        return (problem, [("trays", trays), ("per_tray", per_tray), ("sold", sold), ("bag", bag)],
                "(trays * per_tray - sold) // bag", "bags")
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    wage, weeks = rng.randint(5, 30), rng.randint(2, 8)
    spent = rng.randint(1, wage * weeks - 1)
    problem = (f"{name} earns {wage} dollars a week for {weeks} weeks and spends {spent} dollars on a {item}. "
               f"How many dollars does {name} have left?")
    return problem, [("wage", wage), ("weeks", weeks), ("spent", spent)], "wage * weeks - spent", "left"


@template("comparison")
def comparison(rng: random.Random):
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    other = rng.choice([n for n in NAMES if n != name])
    have, fewer = rng.randint(10, 60), rng.randint(1, 9)
    problem = (f"{name} has {have} {things}. {other} has {fewer} fewer {things} than {name}. "
               f"How many {things} do they have together?")
    return problem, [("have", have), ("fewer", fewer)], "have + (have - fewer)", "together"


@template("discount")
def discount(rng: random.Random):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    percent = rng.choice((10, 20, 25, 50))
    price = rng.randint(1, 12) * (100 // percent) * 2  # a whole-dollar sale price
    problem = (f"The {item} {name} wants costs {price} dollars. It is sold at {percent} percent off. "
               f"What is the sale price in dollars?")
    return problem, [("price", price), ("percent", percent)], "price * (100 - percent) // 100", "sale"


def program_of(given: list[tuple[str, int]], expression: str, result: str) -> str:
    lines = [f"{variable} = {value}" for variable, value in given]
    return "\n".join(lines + [f"{result} = {expression}", f"print({result})"])


def problem_id(problem: str) -> str:
    return "arith-" + hashlib.sha1(problem.encode("utf-8")).hexdigest()[:12]


def make_problem(rng: random.Random, name: str) -> dict:
    problem, given, expression, result = TEMPLATES[name](rng)
    answer = eval(expression, {}, dict(given))  # noqa: S307 - our own template expression, not model output
    return {"id": problem_id(problem), "template": name, "problem": problem, "answer": int(answer),
            "program": program_of(given, expression, result), "synthetic": True}


@functools.lru_cache(maxsize=8)
def generate_problems(count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED) -> tuple[dict, ...]:
    """`count` distinct problems (templates taken in turn, numbers from `seed`), in a fixed order."""
    rng = random.Random(seed)
    names = sorted(TEMPLATES)
    out, seen, attempts = [], set(), 0
    while len(out) < count:
        attempts += 1
        if attempts > 20 * count:
            raise DataError(f"the templates cannot make {count} distinct problems; ask for fewer")
        record = make_problem(rng, names[len(out) % len(names)])
        if record["id"] not in seen:
            seen.add(record["id"])
            out.append(record)
    return tuple(out)


def with_texts(record: dict, target: str) -> dict:
    """The record with the training text of a target: `program` (problem -> program, PaD) or `answer`
    (problem -> answer, the direct baseline); `prompt` is what a model continues, `reference` the rest."""
    if target == "program":
        prompt, reference = PROGRAM_PROMPT.format(problem=record["problem"]), record["program"]
    elif target == "answer":
        prompt, reference = ANSWER_PROMPT.format(problem=record["problem"]), f" {record['answer']}"
    else:
        raise ValueError(f"unknown target {target!r}; valid: program, answer")
    return {**record, "prompt": prompt, "reference": reference.strip(), "text": prompt + reference}


def problem_records(split: str, target: str = "program", count: int = DEFAULT_COUNT,
                    seed: int = DEFAULT_SEED) -> list[dict]:
    """The generated problems of one split (train/eval/test, split by a hash of the id)."""
    from kdistill.data.corpora import split_of

    return [with_texts(r, target) for r in generate_problems(count, seed) if split_of(r["id"]) == split]


def read_problem_file(path: str | Path, target: str = "program", problem: str = "problem",
                      answer: str = "answer") -> list[dict]:
    """Real problems from a .jsonl file with a problem and an answer field per line (other fields are
    kept); the records get the same prompt/text fields as the generated ones."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"problem file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number} is not valid JSON: {err.msg}") from None
            missing = [k for k in (problem, answer) if not isinstance(row, dict) or row.get(k) is None]
            if missing:
                raise DataError(f"{path} line {number} has no {' or '.join(missing)} field; each line needs "
                                f"{{\"{problem}\": \"...\", \"{answer}\": ...}}")
            record = {**row, "problem": str(row[problem]), "answer": row[answer]}
            record.setdefault("id", f"{path.stem}-{number}")
            record.setdefault("program", "")
            records.append(with_texts(record, target))
    if not records:
        raise DataError(f"{path} has no problems")
    return records
