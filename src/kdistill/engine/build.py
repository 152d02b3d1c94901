"""Config to objects, in one place: a validated Stage becomes the teacher, student, terms and data."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdistill.config import Stage
from kdistill.data import TextCollator, label_names, load_records
from kdistill.data.sources import spread
from kdistill.data.collate import check_prompts_lead
from kdistill.engine.classes import check_all_or_none_labelled, check_teacher_classes, class_head, give_head
from kdistill.engine.params import check_freeze, check_globs
from kdistill.errors import CheckpointError, ConfigError, DataError, PairingError, article
from kdistill.losses import LOSSES, LossTerm
from kdistill.models.arch import ModelInfo, model_info
from kdistill.models.blueprints import is_blueprint
from kdistill.models.loading import (Loaded, detect_task, load_config, load_model, load_tokenizer,
                                     TOKENIZER_FILES, new_model, read_pooling, resolve_model_path)
from kdistill.models.student import build_student
from kdistill.models.taps import TapReader
from kdistill.teachers.cached import check_store_teacher, open_for_stage
from kdistill.teachers.recipe_runs import resolve_teacher


@dataclass
class StageParts:
    teacher: object
    teacher_info: ModelInfo
    teacher_dir: str
    student: object
    student_info: ModelInfo
    tokenizer: object
    terms: list[LossTerm]
    train_records: list[dict]
    eval_records: list[dict]
    collator: object  # TextCollator or ImageCollator
    labels: list[str] | None = None
    store: object | None = None  # a teacher store (teacher.source: cache) instead of a live teacher
    needs_mlm: bool = False
    student_taps: set[str] = field(default_factory=set)
    teacher_taps: set[str] = field(default_factory=set)


def read_sources(specs, split: str, where: str, seed: int = 0) -> list[dict]:
    specs = specs if isinstance(specs, list) else [specs]
    records = []
    for i, spec in enumerate(specs):
        fields = spec.model_dump(exclude_none=True, exclude={"augment"})
        try:
            loaded = load_records(fields, split_default=split)
        except (DataError, ConfigError) as err:  # the message says what is wrong; the prefix says where
            place = f"{where}[{i}]" if len(specs) > 1 else where
            raise type(err)(f"{place}: {err}") from None
        if spec.augment is not None and split == "train":
            from kdistill.data.augment import augment_records

            loaded = augment_records(loaded, spec.augment.copies, spec.augment.replace_prob, seed=seed)
        records += loaded
    if not records:
        raise DataError(f"{where}: no records")
    return records


def unique_names(terms: list[LossTerm]) -> None:
    seen: dict[str, int] = {}
    for term in terms:
        seen[term.name] = seen.get(term.name, 0) + 1
        if seen[term.name] > 1:
            term.params.name = f"{term.name}_{seen[term.name]}"


def build_terms(stage: Stage, student_info: ModelInfo, teacher_info: ModelInfo, prefix: str = "") -> list[LossTerm]:
    terms = [LOSSES.get(p.type, f"{prefix}losses[{i}].type")(p, student_info, teacher_info, where=f"{prefix}losses[{i}]")
             for i, p in enumerate(stage.losses)]
    unique_names(terms)
    return terms


def check_store_stage(stage: Stage, prefix: str) -> None:
    """A teacher store holds the teacher's top-k log-probabilities, no weights: the student may not copy the
    teacher's layers, and only terms that read those log-probabilities can train from it. Checked from the recipe
    alone, before an automatic store is built (a pass of the teacher over the data)."""
    if stage.student is not None and stage.student.kind()[0] in ("from_teacher", "theseus"):
        raise ConfigError(f"{prefix}student: {stage.student.kind()[0]} copies the teacher's weights, which a "
                          f"teacher store does not hold; use student.config or student.model")
    from kdistill.teachers.store_writer import manifest_field

    sampled = stage.teacher.sample is not None or manifest_field(stage.teacher.path, "sampled")
    for i, params in enumerate(stage.losses):
        divergence = getattr(params, "divergence", "kl")
        if sampled and divergence != "kl":
            raise PairingError(f"{prefix}losses[{i}]: a sampled teacher store estimates forward KL without bias, not "
                               f"{divergence}; use divergence: kl, or a top-k store (no sample: / --sample)")
        why = LOSSES.get(params.type, f"{prefix}losses[{i}].type").store_refusal(params)
        if why is not None:
            raise PairingError(f"{prefix}losses[{i}]: {params.type}{why} needs the live teacher (its full outputs, "
                               f"hidden states or LM head), which a teacher store does not hold (only its top-k "
                               f"log-probabilities); use logit_kd (or deit) without chunk_size with a store, or "
                               f"the live teacher (teacher.source: live)")


def check_student_tokenizer(stage: Stage, tokenizer, prefix: str) -> None:
    """A student saved with its own tokenizer must read tokens as the teacher's does: the data is tokenized once,
    with the teacher's tokenizer, for both."""
    kind, spec = stage.student.kind() if stage.student is not None else (None, None)
    if kind != "model" or is_blueprint(spec) or not hasattr(tokenizer, "get_vocab"):
        return
    own = load_tokenizer(resolve_model_path(spec))
    if own is None or not hasattr(own, "get_vocab"):
        return
    # tokens the student adds (special ones, say) are never in the data; a teacher's added token the student
    # lacks only matters if it occurs, and check_text_fits already bounds the ids
    mine, added = own.get_vocab(), set(tokenizer.get_added_vocab()) if hasattr(tokenizer, "get_added_vocab") else set()
    wrong = [(tok, i) for tok, i in tokenizer.get_vocab().items() if mine.get(tok, i if tok in added else None) != i]
    if not wrong:
        return
    tok, i = sorted(wrong, key=lambda pair: pair[1])[0]
    raise PairingError(f"{prefix}student.model: {spec}'s tokenizer is not the teacher's: {len(wrong)} of the teacher's "
                       f"{len(tokenizer)} tokens have another id or none in the student's (e.g. {tok!r}: {i} for the "
                       f"teacher, {mine.get(tok)} for the student); the data is tokenized with the teacher's, so this "
                       f"student would read other tokens than it learned; use a student with the teacher's tokenizer "
                       f"(student.from_teacher or student.config) or a teacher with its own")


def positions_of(model) -> int | None:
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return positions if isinstance(positions, int) else None


def pad_for_classifiers(models, tokenizer) -> None:
    """A classifier that pools the last real token (GPT-2, Llama) finds it by config.pad_token_id, and with
    none refuses any batch of two: give it the pad of the tokenizer that pads the batches (saved with it)."""
    from kdistill.data.collate import fill_id

    pad = fill_id(tokenizer) if tokenizer is not None else None
    for model in models:
        if pad is not None and getattr(model.config, "pad_token_id", 0) is None:
            model.config.pad_token_id = pad


def check_text_fits(student, teacher, tokenizer, max_length: int, prefix: str, new_tokens: int = 0) -> None:
    """Both models read the teacher's tokenizer's ids, padded or cut to data.max_length: an id past the student's
    embedding table, or a position past either model's, fails deep inside torch (an index error) otherwise.
    Generated batches add `new_tokens` to their prompts, which are cut to make room for them (OnPolicy)."""
    embeddings = student.get_input_embeddings() if hasattr(student, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if tokenizer is not None and rows is not None and rows < len(tokenizer):
        raise PairingError(
            f"{prefix}student: its vocabulary has {rows:,} tokens but the teacher's tokenizer has {len(tokenizer):,}; "
            f"the student reads the teacher's tokenizer, so give it at least that many (student.config.vocab_size) "
            f"or use a model that shares the teacher's tokenizer")
    for who, model in (("student", student), ("teacher", teacher)):
        positions = positions_of(model)
        if positions is not None and max_length > positions:
            raise ConfigError(f"{prefix}data.max_length is {max_length} but the {who} has {positions} positions; "
                              f"lower data.max_length to {positions} or less")
        if positions is not None and new_tokens >= positions:
            raise ConfigError(f"{prefix}on_policy.max_new_tokens is {new_tokens} but the {who} has {positions} "
                              f"positions, prompt included; lower max_new_tokens below {positions}")


def cached_teacher_dir(stage: Stage, prefix: str) -> str:
    from kdistill.teachers.cached import TEACHER_FILES

    path = Path(stage.teacher.path) / TEACHER_FILES
    if not Path(stage.teacher.path).exists():
        raise CheckpointError(f"{prefix}teacher.path: {stage.teacher.path} does not exist; build a store there with "
                              f"`kdistill cache-teacher RECIPE --out {stage.teacher.path}`")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{prefix}teacher.path: {stage.teacher.path} is not a teacher store (no "
                              f"{TEACHER_FILES}/config.json); build one with `kdistill cache-teacher RECIPE`")
    text = "vocab_size" in json.loads((path / "config.json").read_text())  # an image teacher may have no processor
    if text and not any((path / name).exists() for name in TOKENIZER_FILES):  # else reported as "another tokenizer"
        raise CheckpointError(f"{prefix}teacher.path: {stage.teacher.path} is damaged: {TEACHER_FILES}/ has lost the "
                              f"teacher's tokenizer; build the store again with `kdistill cache-teacher RECIPE`")
    return str(path)


def skeleton(path: str, task: str, head: dict, trust_remote_code: bool = False) -> Loaded:
    """The teacher's architecture without weights (meta tensors): shapes for pairing and student config."""
    config = load_config(path, trust_remote_code)[1]
    for key, value in head.items():
        setattr(config, key, value)
    with torch.device("meta"):
        model = new_model(config, task)
    return Loaded(model, load_tokenizer(path, trust_remote_code), path, task)


def shortest_first(records: list[dict]) -> list[dict]:
    """For passes that sum over every record (evaluation, least-squares fits), where order is free: batches of
    similar length pad little (half the time for glosses batched as they come). Records without text keep their
    order."""
    return sorted(records, key=lambda r: len(r["text"]) + len(r.get("text_pair") or "")
                  if isinstance(r.get("text"), str) else 0)


def quantize_student(student, stage: Stage, collator, train: list[dict], prefix: str) -> None:
    """Move the student to the stage's precision and initialise its activation quantizers on the
    first batch of the (unshuffled) training data, so every process starts from the same scales."""
    from kdistill.quant.model import calibrate, quantize_model

    quantize_model(student, stage.quant.model_dump(), where=f"{prefix}quant")
    batch = collator(train[: stage.train.batch_size])
    batch.pop("labels", None)
    calibrate(student, batch)


def make_collator(stage: Stage, loaded: Loaded, config, labels: list[str] | None, prefix: str, student_config=None):
    """A convnet teacher takes any image size: then the student's (a ViT's) decides, unless data.image_size does."""
    label_to_id = {name: i for i, name in enumerate(labels)} if labels else None
    if loaded.task == "image-classification":
        from kdistill.data.images import ImageCollator, image_shape

        size, channels = image_shape(config, stage.data.image_size or getattr(student_config, "image_size", None))
        return ImageCollator(size, channels, label_to_id, stage.data.image_augment)
    if loaded.tokenizer is None or not callable(getattr(loaded.tokenizer, "pad", None)):
        raise DataError(f"{prefix}teacher.model: {stage.teacher.model} has no tokenizer (none of "
                        f"{', '.join(TOKENIZER_FILES)} or another tokenizer file); text distillation needs one: copy "
                        f"the tokenizer files from the model it came from into its directory")
    if stage.data.image_augment is not None:
        raise ConfigError(f"{prefix}data.image_augment: the teacher is {article(loaded.task)} model, not an image "
                          f"classifier")
    completion_only = stage.data.loss_on == "completion"
    if completion_only and loaded.task != "causal-lm":
        raise ConfigError(f"{prefix}data.loss_on: completion is for causal-LM students (the teacher is "
                          f"{article(loaded.task)} model); remove it")
    return TextCollator(loaded.tokenizer, stage.data.max_length, label_to_id, completion_only,
                        token_types=loaded.task != "causal-lm")


def stage_records(stage: Stage, prefix: str, generated: bool) -> tuple[list[dict], list[dict]]:
    """The stage's training and eval records, with the checks that need only them."""
    train = read_sources(stage.data.train, "train", f"{prefix}data.train", stage.train.seed)
    if stage.train.batch_size >= 2 * len(train) and not generated:  # copies, and an unnamed out-of-memory kill
        raise ConfigError(f"{prefix}train.batch_size {stage.train.batch_size:,} is at least twice the {len(train):,} "
                          f"training records, so every batch would hold each of them twice or more: lower "
                          f"train.batch_size to {len(train):,} or less, or train on more data")
    evals = read_sources(stage.data.eval, "eval", f"{prefix}data.eval") if stage.data.eval else []
    if stage.data.loss_on == "completion":
        check_prompts_lead(train, f"{prefix}data.train")
        check_prompts_lead(evals, f"{prefix}data.eval")
    return train, evals


def locate_teacher(stage: Stage, prefix: str, console, progress: bool) -> tuple[Stage, str, str]:
    """(the stage, with an automatic store's path filled in; the teacher's folder; its task). A store is built
    here the first time a recipe asks for one without a path."""
    cached = stage.teacher.source == "cache"
    named_beside_store = cached and stage.teacher.path is not None and stage.teacher.model is not None
    if cached:  # before an automatic store is built: the recipe alone decides these
        check_store_stage(stage, prefix)
    if cached and stage.teacher.path is None:  # a store of teacher.model, built once and then reused
        from kdistill.teachers.store_build import automatic_store

        path = str(automatic_store(stage, console, progress))
        stage = stage.model_copy(update={"teacher": stage.teacher.model_copy(update={"path": path})})
    teacher_ref = cached_teacher_dir(stage, prefix) if cached else resolve_teacher(stage.teacher.model, console)
    if named_beside_store:
        check_store_teacher(stage.teacher.model, teacher_ref, prefix, stage.teacher.trust_remote_code)
    task = stage.teacher.task
    if task == "auto":
        task = detect_task(load_config(teacher_ref, stage.teacher.trust_remote_code)[1])
    if task == "masked-lm" and not cached:
        archs = " ".join(load_config(teacher_ref, stage.teacher.trust_remote_code)[1].architectures or [])
        if "MaskedLM" not in archs and "PreTraining" not in archs:  # loaded anyway, the head would be random
            raise PairingError(f"{prefix}teacher.model {stage.teacher.model} was saved without an MLM head "
                               f"({archs or 'no architecture'}), so as task masked-lm it would predict tokens with a "
                               f"random head; use a checkpoint with one (...ForMaskedLM), or a task it was trained for")
    return stage, teacher_ref, task


def image_preprocessing(teacher, student, collator, train: list[dict], evals: list[dict], prefix: str):
    """The image processor the student saves (the one it trained with), after checking that the images open and
    fit both models."""
    from kdistill.data.images import check_image_fits, check_images_open, image_processor

    check_image_fits({f"{prefix}teacher": teacher, f"{prefix}student": student}, collator,
                     {"train": train, "eval": evals}, prefix)
    check_images_open(train + evals, prefix)
    if getattr(student.config, "image_size", None) not in (None, collator.image_size):
        # a size-free model (a CNN) trained at data.image_size: its saved config says that size, which
        # `kdistill eval` and other tools resize to
        student.config.image_size = collator.image_size
    return image_processor(collator.image_size, collator.channels, collator.mean, collator.std)


def check_parameter_globs(stage: Stage, student, prefix: str) -> None:
    names = [name for name, _ in student.named_parameters()]
    check_globs(f"{prefix}train.freeze", stage.train.freeze, names)
    check_freeze(f"{prefix}train.freeze", stage.train.freeze, names)
    check_globs(f"{prefix}train.lr_scale", stage.train.lr_scale, names)


def build_stage(stage: Stage, previous_student: str | None = None, prefix: str = "", console=None,
                generated: bool = False, progress: bool = True) -> StageParts:
    """`generated`: the training data was written earlier in this run (a synthesize stage's kept rows, a Lion
    round's answers), so its size was not the user's to choose and a small one is trained on, not refused."""
    train, evals = stage_records(stage, prefix, generated)
    stage, teacher_ref, task = locate_teacher(stage, prefix, console, progress)
    cached = stage.teacher.source == "cache"
    torch.manual_seed(stage.train.seed)  # a new classification head is initialised while loading
    labels, head, foreign = None, {}, None
    if task in ("classification", "image-classification"):
        check_all_or_none_labelled(train, prefix)
        labels, head, foreign = class_head(stage, teacher_ref, train + evals, prefix)
        eval_only = sorted(set(label_names(evals)) - set(label_names(train)))
        if eval_only and console is not None:
            console.print(f"[yellow]{prefix}data.eval has {len(eval_only)} class(es) the training data lacks "
                          f"({', '.join(eval_only[:5])}{', ...' if len(eval_only) > 5 else ''})[/yellow]: the "
                          f"student gets outputs for them but no training record of them")
    teacher_head = {} if foreign else head  # a teacher of other classes keeps its own head
    if cached:
        loaded = skeleton(teacher_ref, task, teacher_head, stage.teacher.trust_remote_code)
    else:
        blueprint = head and is_blueprint(stage.teacher.model)  # a random head of other classes
        loaded = load_model(teacher_ref, task, stage.teacher.trust_remote_code, **teacher_head,
                            **({"ignore_mismatched_sizes": True} if blueprint else {}))
    teacher = loaded.model.eval().requires_grad_(False)
    pooling = read_pooling(loaded.path)
    teacher_info = model_info(teacher, loaded.task, pooling)
    student = build_student(stage.student, teacher, loaded.task, stage.train.seed, previous_student, head,
                            stage.train.steps, stage.teacher.trust_remote_code)
    if foreign and getattr(student.config, "id2label", None) != head["id2label"]:  # built from the teacher's class
        give_head(student, head)
    if loaded.task != "image-classification":
        new_tokens = stage.on_policy.max_new_tokens if stage.on_policy and stage.on_policy.fraction > 0 else 0
        check_text_fits(student, teacher, loaded.tokenizer, stage.data.max_length, prefix, new_tokens)
        if previous_student is None:
            check_student_tokenizer(stage, loaded.tokenizer, prefix)
        if loaded.task == "classification":
            pad_for_classifiers((teacher, student), loaded.tokenizer)
    if stage.train.head_init == "fit":  # here, so `validate --full` and a run refuse it before the first step
        from kdistill.engine.head_fit import classifier_layer

        classifier_layer(student)
    collator = make_collator(stage, loaded, teacher.config, labels, prefix, student.config)
    tokenizer = loaded.tokenizer
    if loaded.task == "image-classification":  # the student saves the preprocessing it was trained with
        tokenizer = image_preprocessing(teacher, student, collator, train, evals, prefix)
    if stage.quant is not None:
        quantize_student(student, stage, collator, train, prefix)
    # against the student as it trains (quantizers add parameters), and here rather than in the loop, so that
    # validate --full checks a later stage's globs and messages name the stage
    check_parameter_globs(stage, student, prefix)
    student_info = model_info(student, loaded.task, pooling)
    if labels is not None and getattr(student.config, "num_labels", None) != len(labels):
        raise PairingError(f"{prefix}data.train has {len(labels)} classes but the student has "
                           f"{student.config.num_labels} outputs")
    terms = build_terms(stage, student_info, teacher_info, prefix)
    if labels is not None and not any(r.get("label") is not None for r in train):
        needing = [t.where for t in terms if t.uses_labels()]
        needing += [f"{prefix}teacher.update"] if stage.teacher.update else []
        if needing:
            raise DataError(f"{prefix}data.train has no labels, but {', '.join(needing)} "
                            f"{'trains' if len(needing) == 1 else 'train'} on them; give each source its label field "
                            f"(`label:` for a file), or use only terms that need no labels (e.g. logit_kd with alpha: 0)")
    s_reader, t_reader = TapReader(student, student_info), TapReader(teacher, teacher_info)
    student_taps = set().union(*(s_reader.canonical(t.student_taps(), t.where) for t in terms))
    teacher_taps = set().union(*(t_reader.canonical(t.teacher_taps(), t.where) for t in terms))
    check_teacher_classes(foreign, labels, terms, prefix, {"train": train, "eval": evals})
    if stage.on_policy is not None and (cached or student_info.task != "causal-lm"):
        raise ConfigError(f"{prefix}on_policy: the student samples its own continuations, which needs a causal-LM "
                          f"student and a live teacher to score them (not a teacher store)")
    store = open_for_stage(stage, loaded.tokenizer, train, prefix, collator) if cached else None
    return StageParts(
        store=store, teacher=None if cached else teacher, teacher_info=teacher_info, teacher_dir=loaded.path, student=student,
        student_info=student_info, tokenizer=tokenizer, terms=terms, train_records=train,
        eval_records=shortest_first(spread(evals, stage.data.eval_limit)), collator=collator, labels=labels,
        needs_mlm=any(t.needs_mlm for t in terms), student_taps=student_taps, teacher_taps=teacher_taps,
    )
