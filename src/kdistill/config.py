"""The recipe schema (pydantic). Errors name the field path, e.g. `stages[1].train.lr`.

A recipe is shared defaults plus an optional list of `stages`; each stage is the defaults with its own
blocks merged on top (dicts merge, lists and scalars replace). Reading, merging and the validation of
registered parts (loss terms, filters, referees) are in kdistill.recipe_loading; the data blocks in
kdistill.config_data, the blocks of API-based stages (synthesize, Lion) in kdistill.config_api.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from kdistill.config_api import APITeacher, GeneratorTeacher, LionConfig, Sampling, SynthesizeConfig  # noqa: F401
from kdistill.config_data import Augment, DataConfig, DataSource, ImageAugment, Strict, UserPath, suggest  # noqa: F401


RECIPES_DIR = Path(__file__).parent / "recipes"
STAGE_TEACHER = "stage:"
STAGE_FIELDS = ("teacher", "student", "data", "losses", "train", "quant", "on_policy", "lion")


def positive_multipliers(value: dict[str, float]) -> dict[str, float]:
    bad = {k: v for k, v in value.items() if not v > 0}
    if bad:
        raise ValueError(f"multipliers must be > 0, got {bad}")
    return value


LrScale = Annotated[dict[str, float], AfterValidator(positive_multipliers)]  # parameter-name globs -> multiplier


class TeacherUpdate(Strict):
    """ProKT: the teacher keeps learning (task loss + KL toward the student) with its own optimizer: AdamW at a
    constant rate (no warmup or decay), weight decay 0.01 on every parameter, the KL at `temperature` not scaled
    by τ² (kl_weight is its weight at any temperature). Each step the teacher moves first, then the student
    distils from the moved teacher."""
    lr: float = Field(1e-5, gt=0)
    kl_weight: float = Field(1.0, ge=0, description="weight of KL(student ‖ teacher) in the teacher's loss")
    temperature: float = Field(1.0, gt=0)
    lr_scale: LrScale = Field(
        default_factory=dict, description="learning-rate multipliers for teacher parameters matching these globs "
        "(the first that matches wins), e.g. {'classifier.*': 10} for a teacher whose head starts untrained")


class TeacherConfig(Strict):
    model: str | None = Field(None, description="local dir, hub id, recipe:NAME, packaged:NAME, blueprint:NAME, stage:NAME")
    source: Literal["live", "cache"] = Field("live", description="live: run the model; cache: read a teacher store")
    path: UserPath | None = Field(None, description="the teacher store (source: cache), from `kdistill cache-teacher`; "
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
        if self.source == "live" and (self.path is not None or self.top_k != type(self).model_fields["top_k"].default):
            # else silently a live teacher: the store the user meant is never read
            raise ValueError("path: and top_k: describe a teacher store; add source: cache (or drop them)")
        if self.path and "top_k" in self.model_fields_set:  # else silently the store's own k
            raise ValueError("top_k: says how the automatic teacher store is built; a store at a path keeps the k it "
                             "was built with: drop top_k, or cut the store to a smaller k with `kdistill cache-teacher "
                             "--from-store STORE --k K`")
        if self.sample_head and self.sample is None:
            raise ValueError("sample_head: keeps the top H beside `sample: N` draws; set sample: too (or drop it)")
        return self


class FromTeacher(Strict):
    layers: list[int] | Literal["uniform", "every_other"] = "uniform"
    num_layers: int | None = Field(None, ge=1, description="for layers: uniform (default: half the teacher's layers)")
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
        if self.num_layers is not None and self.layers != "uniform":
            raise ValueError(f"num_layers is for layers: uniform; with layers: {self.layers} the student has "
                             f"those layers: drop num_layers")
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

    @model_validator(mode="after")
    def whole_micro_batches(self):
        # the processes of a distributed launch split each micro-batch again: the engine checks that at start
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum} (each "
                             f"optimizer step is grad_accum micro-batches of equal size)")
        return self


class QuantConfig(Strict):
    """Quantization-aware training of the student at this precision (kdistill.quant)."""
    weights: Literal[1, 2, 4, 8, 32] = Field(32, description="1 binary (BWN), 2 ternary (TWN), 4/8 uniform, 32 float")
    activations: Literal[1, 4, 8, 32] = Field(32, description="1 elastic binary (BiT), 4/8 learned step (LSQ), 32 float")
    keep_fp: list[Literal["embeddings", "classifier"]] = Field(
        default_factory=lambda: ["embeddings", "classifier"], description="parts kept in full precision")
    attention: bool = Field(True, description="also quantize the attention matmul inputs (Q, K, V, probabilities)")
    split: bool = Field(True, description="ternary -> binary by BinaryBERT's weight splitting (else re-binarize)")

    @field_validator("keep_fp")
    @classmethod
    def embeddings_kept(cls, keep_fp):
        # refused when the recipe is read, not after the stages before this one have trained
        if "embeddings" not in keep_fp:
            raise ValueError("quantized embeddings are not supported; keep 'embeddings' in the list")
        return keep_fp


class OnPolicyConfig(Strict):
    """GKD's on-policy data: a fraction of micro-batches are the student's own samples."""
    fraction: float = Field(0.5, ge=0, le=1, description="λ: probability that a micro-batch is generated by the student")
    temperature: float = Field(1.0, gt=0, description="the student's sampling temperature")
    max_new_tokens: int = Field(32, ge=1)
    teacher_mix: float = Field(0.0, ge=0, lt=1, description="MiniLLM's α: sample from α·p_teacher + (1−α)·q_student "
                               "and record importance weights q/mix; 0 samples from the student alone")
    generator: Literal["student", "teacher"] = Field("student", description="teacher: SeqKD, the teacher writes the text")
    greedy: bool = Field(False, description="greedy decoding instead of sampling")

    @model_validator(mode="after")
    def one_way_to_write(self):
        # teacher-mixed sampling draws every token from α·p + (1−α)·q: neither the teacher alone nor greedy
        if self.teacher_mix > 0 and (self.generator == "teacher" or self.greedy):
            chosen = " and ".join(x for x, on in (("generator: teacher", self.generator == "teacher"),
                                                  ("greedy: true", self.greedy)) if on)
            raise ValueError(f"teacher_mix (MiniLLM's sampling) draws each token from a mix of teacher and student; "
                             f"{chosen} (SeqKD's writing) cannot go with it: keep one of the two")
        return self


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
        generated = self.on_policy is not None and self.on_policy.fraction > 0
        if self.teacher.update is not None and generated:
            raise ValueError("teacher.update (ProKT): the teacher's task loss would train it on on_policy's generated "
                             "samples as if they were labelled data; remove on_policy or teacher.update")
        if self.teacher.update is not None and self.student is not None and self.student.theseus is not None:
            raise ValueError("teacher.update (ProKT) with a student.theseus hybrid: the teacher moves toward the "
                             "student read in eval mode, the successors alone, not the hybrid that trains; use one "
                             "method per stage")
        if not generated and any(isinstance(t, dict) and t.get("type") == "minillm" for t in self.losses):
            # on data batches the term is only its language-modelling loss: the run would be SFT under another name
            raise ValueError("losses: minillm learns from the student's own samples, and this stage generates none: "
                             "add on_policy: {fraction: 0.5} (MiniLLM's default), or use cross_entropy for plain SFT")
        policy = self.on_policy
        if generated and any(isinstance(t, dict) and t.get("type") == "minillm" for t in self.losses):
            # its importance weights correct mixed sampling toward the student at temperature 1, nothing else
            off = [field for field, wrong in (("generator: teacher", policy.generator == "teacher"),
                                              ("greedy: true", policy.greedy),
                                              (f"temperature: {policy.temperature:g}", policy.temperature != 1))
                   if wrong]
            if off:
                raise ValueError(f"losses: minillm's policy gradient needs the student's own samples at temperature "
                                 f"1 (teacher_mix, MiniLLM's mixing, is allowed); on_policy has {', '.join(off)}: "
                                 f"drop {'it' if len(off) == 1 else 'them'}, or use logit_kd for SeqKD-style data")
        return self


class Recipe(Strict):
    name: str
    output: UserPath
    stages: list[Stage]

    @property
    def trusts_remote_code(self) -> bool:
        """A recipe that trusts a teacher's own code trusts it in the students built from that teacher (their
        saved directories carry the same code)."""
        return any(stage.teacher.trust_remote_code for stage in self.stages)

    def dump(self) -> dict:
        out = self.model_dump(mode="json", exclude_none=True)
        for stage in out["stages"]:
            if "synthesize" in stage:  # training defaults mean nothing in a synthesize stage
                stage.pop("train", None)
                stage.pop("losses", None)
        return out


# Reading, merging and validating recipe files is the other half (kdistill/recipe_loading.py, and comparing them
# kdistill/recipe_diff.py); the names other modules import from here, loaded on first use so that those modules can
# import the schema above.
LOADING = ("builtin_recipes", "data_specs", "load_recipe")
DIFFING = ("diff_configs", "recipe_changes", "BOOKKEEPING")


def __getattr__(name: str):
    if name in LOADING or name in DIFFING:
        from kdistill import recipe_diff, recipe_loading

        return getattr(recipe_loading if name in LOADING else recipe_diff, name)
    raise AttributeError(f"module 'kdistill.config' has no attribute {name!r}")
