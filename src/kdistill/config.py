"""The recipe schema (pydantic). Errors name the field path, e.g. `stages[1].train.lr`.

A recipe is shared defaults plus an optional list of `stages`; each stage is the defaults with its own
blocks merged on top (dicts merge, lists and scalars replace). Reading, merging and the validation of
registered parts (loss terms, filters, referees) are in kdistill.recipe_loading.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


RECIPES_DIR = Path(__file__).parent / "recipes"
STAGE_TEACHER = "stage:"
STAGE_FIELDS = ("teacher", "student", "data", "losses", "train", "quant", "on_policy", "lion")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def positive_multipliers(value: dict[str, float]) -> dict[str, float]:
    bad = {k: v for k, v in value.items() if not v > 0}
    if bad:
        raise ValueError(f"multipliers must be > 0, got {bad}")
    return value


LrScale = Annotated[dict[str, float], AfterValidator(positive_multipliers)]  # parameter-name globs -> multiplier


class TeacherUpdate(Strict):
    """ProKT: the teacher keeps learning (task loss + KL toward the student) with its own optimizer."""
    lr: float = Field(1e-5, gt=0)
    kl_weight: float = Field(1.0, ge=0, description="weight of KL(student ‖ teacher) in the teacher's loss")
    temperature: float = Field(1.0, gt=0)
    lr_scale: LrScale = Field(
        default_factory=dict, description="learning-rate multipliers for teacher parameters matching these globs "
        "(the first that matches wins), e.g. {'classifier.*': 10} for a teacher whose head starts untrained")


class TeacherConfig(Strict):
    model: str | None = Field(None, description="local dir, hub id, recipe:NAME, packaged:NAME, blueprint:NAME, stage:NAME")
    source: Literal["live", "cache"] = Field("live", description="live: run the model; cache: read a teacher store")
    path: str | None = Field(None, description="the teacher store (source: cache), from `kdistill cache-teacher`; "
                             "without it, a store of `model` is built once under $KDISTILL_HOME/stores")
    top_k: int = Field(64, ge=1, description="source: cache without a path: outputs kept per position")
    sample: int | None = Field(None, ge=1, description="source: cache without a path: keep this many tokens drawn "
                               "from the teacher per position instead of its top_k (unbiased for forward KL only)")
    sample_head: int = Field(0, ge=0, description="with sample: also keep the teacher's H most likely tokens exactly, "
                             "drawing the sample from the rest of its distribution")
    update: TeacherUpdate | None = Field(None, description="train the teacher in the loop (ProKT)")
    task: Literal["auto", "embedding", "masked-lm", "causal-lm", "classification", "image-classification"] = "auto"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def source_fields(self):
        if self.source == "live" and not self.model:
            raise ValueError("model is required (or source: cache with a path)")
        if self.source == "cache" and (not (self.path or self.model) or self.update):
            raise ValueError("source: cache needs path: (a store from `kdistill cache-teacher`) or model: (a store "
                             "built once, automatically), and no update:")
        if self.sample is not None and (self.source != "cache" or self.path):
            raise ValueError("sample: says how the automatic teacher store is built; it needs source: cache and no "
                             "path: (a store at a path was built as `kdistill cache-teacher --sample N` made it)")
        if self.sample_head and self.sample is None:
            raise ValueError("sample_head: keeps the top H beside `sample: N` draws; set sample: too (or drop it)")
        return self


class FromTeacher(Strict):
    layers: list[int] | Literal["uniform", "every_other"] = "uniform"
    num_layers: int | None = Field(None, ge=1, description="for layers: uniform")
    model: str | None = Field(None, description="copy the layers of this model (same architecture) instead of "
                              "the teacher's, e.g. the pretrained checkpoint a task teacher was fine-tuned from")
    hidden_size: int | None = Field(None, ge=1, description="a narrower student (BERT-family encoders): every weight "
                                    "cut to this width, keeping the first dimensions of the residual stream and "
                                    "of each attention head; the head count stays the teacher's")
    intermediate_size: int | None = Field(None, ge=1, description="with hidden_size: the feed-forward width to cut to "
                                          "(default: the teacher's ratio to its hidden size)")
    layers_from: str | None = Field(None, description="copy only the chosen layers from this model (same architecture); "
                                    "embeddings and head stay the teacher's (the baseline of a Theseus run whose "
                                    "successors start from another model)")

    @model_validator(mode="after")
    def width_needs_hidden_size(self):
        if self.intermediate_size is not None and self.hidden_size is None:
            raise ValueError("intermediate_size cuts a narrower student; give hidden_size too")
        return self


class Theseus(Strict):
    """BERT-of-Theseus: the teacher's blocks in `modules` groups, each with a one-block successor."""
    modules: int = Field(3, ge=1, description="groups of teacher blocks; each gets one successor block")
    start: float = Field(0.5, ge=0, le=1, description="replacement probability at step 0")
    full_at: float = Field(0.8, gt=0, le=1, description="fraction of the stage's steps where it reaches 1")
    successors: Literal["top", "first"] = Field(
        "top", description="top: successor i copies the top block of group i; first: it copies teacher block i "
                           "(the reference code's choice: the first `modules` blocks of the fine-tuned teacher)")
    layers_from: str | None = Field(None, description="successors copy those blocks of this model (same architecture) "
                                    "instead of the teacher's, e.g. the pretrained checkpoint the teacher was "
                                    "fine-tuned from; embeddings and head stay the teacher's")


STUDENT_INITS = ("from_teacher", "config", "model", "theseus")


def suggest(name: str, valid, kind: str) -> str:
    close = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}{hint} valid: {', '.join(valid)}"


class StudentConfig(Strict):
    from_teacher: FromTeacher | None = None
    config: dict[str, Any] | None = None
    model: str | None = None
    theseus: Theseus | None = None

    @model_validator(mode="before")
    @classmethod
    def known_inits(cls, data):
        if isinstance(data, dict):
            for key in data:
                if key not in STUDENT_INITS:
                    raise ValueError(suggest(key, STUDENT_INITS, "student init"))
        return data

    @model_validator(mode="after")
    def exactly_one(self):
        given = [k for k in STUDENT_INITS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(STUDENT_INITS)} (got {given or 'none'})")
        return self

    def kind(self) -> tuple[str, Any]:
        for key in STUDENT_INITS:
            if getattr(self, key) is not None:
                return key, getattr(self, key)
        raise AssertionError("validated to have one")


class Augment(Strict):
    copies: int = Field(4, ge=1, description="augmented copies per record (the original is kept)")
    replace_prob: float = Field(0.4, ge=0, le=1, description="chance of replacing each word with a synonym")


class DataSource(Strict):
    source: str | None = None
    path: str | None = None
    dataset: str | None = None
    config: str | None = None
    split: str | None = None
    text: str = "text"
    label: str | None = None
    text_pair: str | None = None
    limit: int | None = Field(None, ge=1)
    augment: Augment | None = Field(None, description="TinyBERT-style WordNet synonym replacement (train only)")

    @model_validator(mode="after")
    def exactly_one(self):
        given = [k for k in ("source", "path", "dataset") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of source, path, dataset (got {given or 'none'})")
        if self.source is not None:
            from kdistill.data.corpora import CORPORA

            if self.source not in CORPORA:
                raise ValueError(suggest(self.source, CORPORA.names(), "corpus"))
        return self


class ImageAugment(Strict):
    """Random views of training images, seeded per image and epoch so any view can be replayed."""
    shift: float = Field(0.1, ge=0, le=0.5, description="largest shift, as a fraction of the image size")
    rotate: float = Field(10.0, ge=0, le=180, description="largest rotation in degrees")
    scale: tuple[float, float] = Field((0.9, 1.1), description="range of the zoom factor")
    seed: int = Field(0, description="views come from this seed, not train.seed, so one teacher store of the "
                      "views serves every training seed")

    @model_validator(mode="after")
    def ordered(self):
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be [low, high] with 0 < low <= high, got {list(self.scale)}")
        return self


class DataConfig(Strict):
    train: DataSource | list[DataSource]
    eval: DataSource | list[DataSource] | None = None
    max_length: int = Field(128, ge=8)
    eval_limit: int = Field(256, ge=1, description="eval records used during training")
    group_by_length: bool = Field(False, description="batch texts of similar length together (less padding)")
    loss_on: Literal["all", "completion"] = Field(
        "all", description="causal LMs: the positions of a data batch the loss is taken on: every token, or only those "
        "that predict the tokens after each record's `prompt` (after the first half of its tokens where it has none, "
        "as on-policy prompts are cut), like TRL's completion-only loss")
    image_size: int | None = Field(None, ge=4, description="images: resize to this (default: the model's image_size)")
    image_augment: ImageAugment | None = Field(None, description="images: seeded random views for training")


class TrainConfig(Strict):
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1, description="global batch per optimizer step")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup: float = Field(0.1, ge=0, le=1, description="fraction of steps")
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    eval_every: int | None = Field(None, ge=1)
    save_every: int | None = Field(None, ge=1)
    log_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    freeze: list[str] = Field(default_factory=list, description="student parameter names to keep fixed (globs)")
    lr_scale: LrScale = Field(
        default_factory=dict, description="learning-rate multipliers for student parameters matching these globs "
        "(the first glob that matches wins), e.g. {'classifier.*': 10} for a freshly initialised head")
    head_init: Literal["keep", "fit"] = Field(
        "keep", description="fit: before the stage's first step, the student's classifier is set to the least-squares "
        "map from its own features to the teacher's logits (to one-hot labels when the stage reads no teacher); "
        "keep: as the student was built or left by the stage before")


class QuantConfig(Strict):
    """Quantization-aware training of the student at this precision (kdistill.quant)."""
    weights: Literal[1, 2, 4, 8, 32] = Field(32, description="1 binary (BWN), 2 ternary (TWN), 4/8 uniform, 32 float")
    activations: Literal[1, 4, 8, 32] = Field(32, description="1 elastic binary (BiT), 4/8 learned step (LSQ), 32 float")
    keep_fp: list[Literal["embeddings", "classifier"]] = Field(
        default_factory=lambda: ["embeddings", "classifier"], description="parts kept in full precision")
    attention: bool = Field(True, description="also quantize the attention matmul inputs (Q, K, V, probabilities)")
    split: bool = Field(True, description="ternary -> binary by BinaryBERT's weight splitting (else re-binarize)")


class OnPolicyConfig(Strict):
    """GKD's on-policy data: a fraction of micro-batches are the student's own samples."""
    fraction: float = Field(0.5, ge=0, le=1, description="λ: probability that a micro-batch is generated by the student")
    temperature: float = Field(1.0, gt=0, description="the student's sampling temperature")
    max_new_tokens: int = Field(32, ge=1)
    teacher_mix: float = Field(0.0, ge=0, lt=1, description="MiniLLM's α: sample from α·p_teacher + (1−α)·q_student "
                               "and record importance weights q/mix; 0 samples from the student alone")
    generator: Literal["student", "teacher"] = Field("student", description="teacher: SeqKD, the teacher writes the text")
    greedy: bool = Field(False, description="greedy decoding instead of sampling")


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
    cache: str | None = Field(None, description="an SQLite file of the generator's answers (default: the API "
                              "teacher's is {stage dir}/teacher.sqlite; a local model's is off): runs sharing a "
                              "cache never ask the same question twice")
    export: str | None = Field(None, description="also copy the kept rows to this .jsonl file")


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
    cache: str | None = Field(None, description="an SQLite file of the teacher's answers (default: "
                              "{stage dir}/teacher.sqlite): runs sharing it never ask the same question twice")


class Stage(Strict):
    """A training stage (teacher, student, data, losses, train), a synthesize stage (synthesize only) or a
    Lion stage (a training stage with a lion: block)."""
    name: str = "main"
    teacher: TeacherConfig | None = None
    student: StudentConfig | None = None
    data: DataConfig | None = None
    losses: list[Any] = Field(default_factory=list)
    train: TrainConfig = TrainConfig()
    quant: QuantConfig | None = None
    on_policy: OnPolicyConfig | None = None
    synthesize: SynthesizeConfig | None = None
    lion: LionConfig | None = None

    @model_validator(mode="after")
    def training_or_synthesis(self):
        if self.synthesize is not None:
            extra = [k for k in STAGE_FIELDS if getattr(self, k) not in (None, [])]
            extra = [k for k in extra if k != "train" or self.train != TrainConfig()]
            if extra:
                raise ValueError(f"a synthesize stage trains nothing: remove {', '.join(extra)} (its generator is "
                                 f"synthesize.teacher; train on its output in a later stage with "
                                 f"data: {{train: {{path: stage:{self.name}}}}})")
            return self
        missing = [k for k in ("teacher", "data") if getattr(self, k) is None] + ([] if self.losses else ["losses"])
        if missing:
            raise ValueError(f"a training stage needs {', '.join(missing)} (or a synthesize: block instead)")
        if self.lion is not None and self.teacher.source != "live":
            raise ValueError("lion: the imitation data changes every round, so no teacher store can cover it; use "
                             "teacher.source: live (a hosted teacher goes in lion.teacher.api)")
        if self.train.head_init == "fit" and (self.teacher.update is not None or self.teacher.source != "live"):
            why = ("a teacher updated in the loop has not learned the task at step 0" if self.teacher.update else
                   "a teacher store holds top-k log-probabilities, not the logits a least-squares fit reads")
            raise ValueError(f"train.head_init: fit reads the live teacher's logits before step 1, and {why}; "
                             f"leave head_init out of this stage")
        if self.lion is not None and self.on_policy is not None:
            raise ValueError("lion: on_policy would replace the teacher's answers the rounds train on; remove it")
        return self


class Recipe(Strict):
    name: str
    output: str
    stages: list[Stage]

    def dump(self) -> dict:
        out = self.model_dump(mode="json", exclude_none=True)
        for stage in out["stages"]:
            if "synthesize" in stage:  # training defaults mean nothing in a synthesize stage
                stage.pop("train", None)
                stage.pop("losses", None)
        return out


# Reading, merging and validating recipe files is the other half (kdistill/recipe_loading.py); its names stay
# importable from here, loaded on first use so that module can import the schema above.
LOADING = ('builtin_recipes', 'read_recipe_file', 'apply_override', 'merge', 'format_validation', 'validate_losses', 'validate_filter', 'validate_lion', 'data_specs', 'check_stage_references', 'build_recipe', 'load_recipe', 'diff_configs', 'recipe_changes', 'BOOKKEEPING')


def __getattr__(name: str):
    if name in LOADING:
        from kdistill import recipe_loading

        return getattr(recipe_loading, name)
    raise AttributeError(f"module 'kdistill.config' has no attribute {name!r}")
