"""The blocks of API-based stages: who generates (a local causal LM or an OpenAI-compatible service), how it
samples, and the synthesize and Lion stages built on them. kdistill.config re-exports them."""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kdistill.config_data import DataSource, Strict, UserPath


ENV_NAME_RULE = ("teacher.api.api_key_env takes the NAME of the environment variable that holds the key (letters, "
                 "digits and _, e.g. OPENAI_API_KEY), never the key itself: export the key in that variable")


def is_env_name(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) is not None


def only_fields(template: str, allowed: tuple[str, ...]) -> str:
    """`template` if it is a format string over `allowed` only (a pydantic validator's check: the
    prompt is filled in mid-run, after a round of training, where a KeyError would cost that round)."""
    import string

    try:
        used = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"not a valid format string ({err}); write a literal brace as {{{{ or }}}}") from None
    for name in used:
        if name.split(".")[0].split("[")[0] not in allowed:
            raise ValueError(f"uses {{{name}}}, which it does not have; its fields: "
                             f"{', '.join('{' + a + '}' for a in allowed)} (a literal brace is {{{{ or }}}})")
    return template


class APITeacher(Strict):
    """A teacher reached over the OpenAI-compatible protocol (kdistill.api.TeacherAPI)."""
    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1 (`kdistill serve-teacher`) or a hosted service")
    model: str
    api_key_env: str | None = Field(None, description="environment variable holding the key (never the key itself)")
    max_concurrency: int = Field(4, ge=1)
    timeout_s: float = Field(60, gt=0)
    max_retries: int = Field(5, ge=0)
    chat: bool = Field(False, description="ask /chat/completions with the prompt as one user message "
                       "(default: /completions with the prompt as it is)")

    @field_validator("base_url")
    @classmethod
    def no_credentials_in_the_url(cls, value):
        # the URL is written into every generated row, config.resolved.yaml and error messages
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.username or parts.password or parts.query:
            raise ValueError("holds credentials or a query string (user:token@host, ?key=...), which would be saved "
                             "with the run: give the plain service URL and the key's variable in api_key_env")
        return value

    @field_validator("api_key_env")
    @classmethod
    def a_name_not_a_key(cls, value):
        # a pasted key must not be echoed in the message nor reach config.resolved.yaml
        if value is not None and not is_env_name(value):
            raise ValueError(ENV_NAME_RULE)
        return value


class GeneratorTeacher(Strict):
    """Who writes the candidates of a synthesize stage: a local causal LM or a service."""
    model: str | None = Field(None, description="local dir, hub id, recipe:NAME, blueprint:NAME or stage:NAME "
                              "(an earlier training stage's student), sampled in-process")
    api: APITeacher | None = None

    @model_validator(mode="after")
    def exactly_one(self):
        if (self.model is None) == (self.api is None):
            raise ValueError("give exactly one of model (a local causal LM) or api ({base_url, model, ...})")
        return self


class Sampling(Strict):
    temperature: float = Field(0.8, ge=0, le=2, description="0 = greedy (then candidates > 1 repeat themselves)")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1)
    seed: int = Field(0, description="candidates come from this seed, not train.seed, so one synthesized set "
                      "serves every training seed")


class SynthesizeConfig(Strict):
    """A generator writes `candidates` completions per prompt, a filter keeps or drops each, and the kept set
    becomes training data (`data: {train: {path: stage:NAME}}`), with provenance on every row."""
    teacher: GeneratorTeacher
    prompts: DataSource = Field(description="the records to prompt with (any data source; every field of a "
                                "record can be used in template and filter)")
    template: str = Field("{prompt}", description="the prompt text: a format string over the record's fields")
    candidates: int = Field(4, ge=1, le=64, description="completions per prompt")
    sampling: Sampling = Sampling()
    filter: Any = Field(default_factory=lambda: {"type": "none"},
                        description="{type: execution | threshold | none, ...} (kdistill.api.filters)")
    dedupe: bool = Field(True, description="drop a candidate identical to an earlier one of the same prompt")
    text: str = Field("{prompt}{completion}", description="the training text of a row: a format string over "
                      "prompt, completion and the record's fields")
    batch_size: int = Field(8, ge=1, description="prompts generated together (a unit of resumption)")
    cache: UserPath | None = Field(None, description="an SQLite file of the generator's answers (default: the API "
                              "teacher's is {stage dir}/teacher.sqlite; a local model's is off): runs sharing a "
                              "cache never ask the same question twice")
    export: str | None = Field(None, description="also copy the kept rows to this .jsonl file")
    on_teacher_error: Literal["stop", "skip"] = Field(
        "stop", description="prompts the teacher failed on after its retries: stop (the stage is not finished, "
        "and --resume asks only those again) or skip (train on the rest; counted in summary.json)")


class LionConfig(Strict):
    """Lion's adversarial loop (kdistill.api.lion): rounds of imitation (the stage's losses and train settings on
    the teacher's answers to the pool), discrimination (a referee marks the pool's hard instructions) and
    generation (a writer adds instructions like the hard ones, and some like the easy ones). The stage's
    data.train holds the seed instructions."""
    teacher: GeneratorTeacher | None = Field(None, description="who answers the instructions: a local causal LM "
                                             "(default: the stage's teacher.model) or api: {...} for a hosted one")
    rounds: int = Field(3, ge=1)
    seed_instructions: int | None = Field(None, ge=1, description="the first pool: this many records of "
                                          "data.train, sampled with `seed` (default: all of them)")
    new_instructions: int = Field(200, ge=1, description="instructions written after each round for the next")
    hard_share: float = Field(0.5, ge=0, le=1, description="share of the new instructions modelled on hard ones; "
                              "the rest on easy ones")
    template: str = Field("{prompt}", description="an instruction's prompt: a format string over a record's fields")
    text: str = Field("{prompt}{answer}", description="a training text: a format string over prompt and answer")
    answers: Sampling = Field(default_factory=lambda: Sampling(temperature=0.0, max_new_tokens=32),
                              description="how the teacher answers (the student answers greedily, as long)")
    train_on: Literal["pool", "new"] = Field("pool", description="imitation data of a round: every answered "
                                             "instruction so far (pool) or only the round's new ones")
    referee: Any = Field(default_factory=lambda: {"type": "rouge"},
                         description="{type: rouge | llm_judge, ...} (kdistill.api.referees)")
    writer: Any = Field(default_factory=lambda: {"type": "wordnet-neighbours"},
                        description="{type: wordnet-neighbours | wordnet-random | teacher, ...} "
                        "(kdistill.api.instruction_writers)")
    eval: DataSource | None = Field(None, description="held-out prompts with a `reference`: the student's "
                                    "ROUGE-L after each round (and before the first)")
    eval_limit: int = Field(100, ge=1, description="eval prompts used, spread through eval")
    batch_size: int = Field(16, ge=1, description="prompts answered together (teacher and student)")
    seed: int = Field(0, description="the seed pool and the writer's choices")
    cache: UserPath | None = Field(None, description="an SQLite file of the teacher's answers (default: "
                              "{stage dir}/teacher.sqlite): runs sharing it never ask the same question twice")
