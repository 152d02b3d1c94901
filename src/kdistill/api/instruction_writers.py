"""Lion's generation step: writers of new instructions modelled on the hard ones (and some on easy ones).

A writer is a class registered by the name a recipe uses (`lion.writer.type`), with a pydantic `Params`
model and `write(hard, easy, n_hard, n_easy, taken, context)`, which returns (new instruction records,
failures). Records carry `id`, `prompt`, `origin` (hard / easy / random) and `parent` (the instruction it
was modelled on); `taken` holds the ids and prompts already in the pool, which are never written again.

- `teacher`: the teacher writes each new instruction from one example, through the chat API (Lion's way).
  An answer that is empty, too long or already in the pool is a failure for that slot, not a crash.
- `wordnet-neighbours`: the OFFLINE STAND-IN for a teacher writing instructions, for the definition task
  (`word: <lemma> (<pos>)\\ndefinition:`): a new instruction is a training-split WordNet synset next to the
  example in the graph (hypernym, hyponym, sibling, similar-to, also-see), or failing that in the same
  lexicographer file (noun.animal, verb.motion, ...). No model writes anything: the "teacher-written"
  instructions are sampled from WordNet, which keeps the loop offline and reproducible.
- `wordnet-random`: random unused training-split synsets, ignoring hard and easy: the plain-imitation
  control (the same teacher calls on instructions nobody chose).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Literal

from pydantic import Field, field_validator

from kdistill.config import Strict
from kdistill.config_api import APITeacher, only_fields

from kdistill.api.wordnet_graph import RELATIONS
from kdistill.registry import Registry

WRITERS: Registry[type] = Registry("instruction writer")


@dataclass(frozen=True)
class WriteContext:
    render: Callable[[dict], str]  # a corpus record -> its prompt (lion.template)
    seed: int                      # for this round's choices


class WriterParams(Strict):
    type: str


def make_writer(params, teacher_api=None, cache_path=None, where: str = "lion.writer"):
    return WRITERS.get(params.type, f"{where}.type")(params, teacher_api=teacher_api, cache_path=cache_path,
                                                    where=where)


def plan(hard: list[dict], easy: list[dict], n_hard: int, n_easy: int, rng: random.Random) -> list[tuple[str, dict]]:
    """(kind, example) for each instruction to write: hard examples for the hard slots, easy ones for the
    rest, each used in turn (reshuffled) before any is used again. With no hard (or no easy) examples, the
    other kind fills every slot."""
    if not hard and not easy and n_hard + n_easy > 0:  # sampling from nothing would never fill a slot
        raise ValueError("no judged instruction to write new ones from")
    if not hard:
        n_hard, n_easy = 0, n_hard + n_easy
    if not easy:
        n_hard, n_easy = n_hard + n_easy, 0
    slots = []
    for kind, examples, n in (("hard", hard, n_hard), ("easy", easy, n_easy)):
        order: list[dict] = []
        while len(order) < n:
            order += rng.sample(examples, len(examples))
        slots += [(kind, example) for example in order[:n]]
    return slots


class WordNetWriter:
    """The training split of `wordnet-definitions`, by synset id, and the graph around it."""

    def __init__(self):
        from kdistill.api.wordnet_graph import default_directory, wordnet_graph
        from kdistill.data.corpora import wordnet_definitions

        self.graph = wordnet_graph(default_directory())
        self.universe = {r["id"]: r for r in wordnet_definitions("train")}  # never a dev or test synset
        self.by_lexfile: dict[str, list[str]] = {}
        for synset_id in self.universe:
            self.by_lexfile.setdefault(self.graph[synset_id].lexfile, []).append(synset_id)

    def record(self, synset_id: str, context: WriteContext, origin: str, parent: str | None, how: str) -> dict:
        base = self.universe[synset_id]
        return {"id": synset_id, "prompt": context.render(base), "reference": base.get("reference"),
                "origin": origin, "parent": parent, "how": how}

    def unused(self, ids: list[str], taken: set[str], rng: random.Random, tries: int = 64) -> str | None:
        for _ in range(min(tries, len(ids))):
            pick = rng.choice(ids)
            if pick not in taken:
                return pick
        return None

    requests_per_slot = 0  # no service is asked

    def close(self) -> None:
        pass


@WRITERS.register("wordnet-neighbours")
class WordNetNeighbours(WordNetWriter):
    class Params(WriterParams):
        type: Literal["wordnet-neighbours"] = "wordnet-neighbours"
        relations: list[Literal["hypernym", "hyponym", "sibling", "similar", "also"]] = Field(
            default_factory=lambda: list(RELATIONS), description="which graph neighbours are 'like' an example")
        lexfile_fallback: bool = Field(True, description="when no neighbour is unused, take a synset of the "
                                       "example's lexicographer file")

    def __init__(self, params, teacher_api=None, cache_path=None, where: str = "lion.writer"):
        super().__init__()
        self.params = params

    def write(self, hard, easy, n_hard, n_easy, taken: set[str], context: WriteContext):
        from kdistill.api.wordnet_graph import neighbours

        rng = random.Random(context.seed)
        written, failures = [], []
        for kind, example in plan(hard, easy, n_hard, n_easy, rng):
            if example["id"] not in self.graph:
                failures.append({"origin": kind, "parent": example["id"], "reason": "not a WordNet synset id"})
                continue
            near = [n for n in neighbours(self.graph, example["id"], self.params.relations)
                    if n in self.universe and n not in taken]
            pick, how = (rng.choice(near), "neighbour") if near else (None, None)
            if pick is None and self.params.lexfile_fallback:
                pick, how = self.unused(self.by_lexfile[self.graph[example["id"]].lexfile], taken, rng), "lexfile"
            if pick is None:
                failures.append({"origin": kind, "parent": example["id"], "reason": "no unused synset near it"})
                continue
            taken.add(pick)
            written.append(self.record(pick, context, kind, example["id"], how))
        return written, failures


@WRITERS.register("wordnet-random")
class WordNetRandom(WordNetWriter):
    class Params(WriterParams):
        type: Literal["wordnet-random"] = "wordnet-random"

    def __init__(self, params, teacher_api=None, cache_path=None, where: str = "lion.writer"):
        super().__init__()
        self.params, self.ids = params, sorted(self.universe)

    def write(self, hard, easy, n_hard, n_easy, taken: set[str], context: WriteContext):
        rng = random.Random(context.seed)
        written, failures = [], []
        for _ in range(n_hard + n_easy):
            pick = self.unused(self.ids, taken, rng)
            if pick is None:
                failures.append({"origin": "random", "parent": None, "reason": "no unused synset found"})
                continue
            taken.add(pick)
            written.append(self.record(pick, context, "random", None, "random"))
        return written, failures


WRITER_SYSTEM = "You write instructions for training an AI assistant."
WRITER_TEMPLATE = """Here is an instruction given to an AI assistant:

{instruction}

Write one new instruction of the same task type and domain, of similar length and difficulty, about a
different subject. It must make sense and be answerable. Reply with the new instruction only."""
LABELS = ("new instruction:", "instruction:", "#created instruction#:", "created instruction:")


def clean_instruction(text: str) -> str:
    """The instruction in a writer's answer: without a leading label or surrounding quotes."""
    text = (text or "").strip()
    for label in LABELS:
        if text.lower().startswith(label):
            text = text[len(label):].strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


@WRITERS.register("teacher")
class TeacherWriter:
    """The teacher writes each new instruction from one example (chat API); its answers are cached."""

    class Params(WriterParams):
        type: Literal["teacher"] = "teacher"
        api: APITeacher | None = Field(None, description="the writing service {base_url, model, ...} "
                                       "(default: lion.teacher.api)")
        system: str = WRITER_SYSTEM
        template: str = Field(WRITER_TEMPLATE, description="the request: {instruction} (the example) and {kind} "
                              "(hard or easy)")
        temperature: float = Field(1.0, ge=0, le=2)
        max_tokens: int = Field(256, ge=1)
        max_chars: int = Field(2000, ge=1, description="a longer answer is a failure, not an instruction")

        _fields = field_validator("template")(lambda value: only_fields(value, ("instruction", "kind")))

    def __init__(self, params, teacher_api=None, cache_path=None, where: str = "lion.writer", client=None):
        self.params = params
        self.requests_per_slot = 1
        self.client, self.owns_client = client, client is None
        if client is None:
            from kdistill.api.client import TeacherAPI

            self.client = TeacherAPI.for_part(params.api, teacher_api, cache_path, where, "the teacher writer")

    def write(self, hard, easy, n_hard, n_easy, taken: set[str], context: WriteContext):
        rng = random.Random(context.seed)
        slots = plan(hard, easy, n_hard, n_easy, rng)
        requests = [{"messages": [{"role": "system", "content": self.params.system},
                                  {"role": "user", "content": self.params.template.format(
                                      instruction=example["prompt"], kind=kind)}],
                     "temperature": self.params.temperature, "max_tokens": self.params.max_tokens,
                     "seed": context.seed + i, "candidate": i} for i, (kind, example) in enumerate(slots)]
        answers = self.client.map(requests, progress=False) if requests else []
        written, failures = [], []
        for (kind, example), answer in zip(slots, answers):
            fail = {"origin": kind, "parent": example["id"]}
            if not answer.ok:
                failures.append({**fail, "reason": f"writer request failed: {answer.error}"})
                continue
            prompt = clean_instruction(answer.text)
            if not prompt or len(prompt) > self.params.max_chars or prompt in taken:
                why = "empty" if not prompt else "too long" if len(prompt) > self.params.max_chars else "already in the pool"
                failures.append({**fail, "reason": f"unusable instruction ({why}): {answer.text.strip()[:200]!r}"})
                continue
            taken.add(prompt)
            written.append({"id": "w" + hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:15], "prompt": prompt,
                            "origin": kind, "parent": example["id"], "how": "teacher"})
        return written, failures

    def close(self) -> None:
        if self.owns_client:
            self.client.close()
