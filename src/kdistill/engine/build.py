"""Config to objects, in one place: a validated Stage becomes the teacher, student, terms and data."""
from __future__ import annotations

from dataclasses import dataclass, field

from kdistill.config import Stage
from kdistill.data import TextCollator, label_names, load_records
from kdistill.errors import DataError, PairingError
from kdistill.losses import LOSSES, LossTerm
from kdistill.models.arch import ModelInfo, model_info
from kdistill.models.loading import load_model, read_pooling
from kdistill.models.student import build_student
from kdistill.models.taps import TapReader


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
    collator: TextCollator
    labels: list[str] | None = None
    needs_mlm: bool = False
    student_taps: set[str] = field(default_factory=set)
    teacher_taps: set[str] = field(default_factory=set)


def read_sources(specs, split: str, where: str) -> list[dict]:
    specs = specs if isinstance(specs, list) else [specs]
    records = []
    for spec in specs:
        records += load_records(spec.model_dump(exclude_none=True), split_default=split)
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


def build_stage(stage: Stage, previous_student: str | None = None, prefix: str = "") -> StageParts:
    loaded = load_model(stage.teacher.model, stage.teacher.task, stage.teacher.trust_remote_code)
    teacher = loaded.model.eval().requires_grad_(False)
    pooling = read_pooling(loaded.path)
    teacher_info = model_info(teacher, loaded.task, pooling)
    if loaded.tokenizer is None:
        raise DataError(f"{prefix}teacher.model: {stage.teacher.model} has no tokenizer; text distillation needs one")
    student = build_student(stage.student, teacher, loaded.task, stage.train.seed, previous_student)
    student_info = model_info(student, loaded.task, pooling)
    terms = build_terms(stage, student_info, teacher_info, prefix)
    s_reader, t_reader = TapReader(student, student_info), TapReader(teacher, teacher_info)
    student_taps = set().union(*(s_reader.canonical(t.student_taps(), t.where) for t in terms))
    teacher_taps = set().union(*(t_reader.canonical(t.teacher_taps(), t.where) for t in terms))

    train = read_sources(stage.data.train, "train", f"{prefix}data.train")
    evals = read_sources(stage.data.eval, "eval", f"{prefix}data.eval") if stage.data.eval else []
    labels = None
    if loaded.task == "classification":
        labels = label_names(train)
        num = getattr(student.config, "num_labels", None)
        if num != len(labels):
            raise PairingError(f"{prefix}data.train has {len(labels)} classes but the student has {num} outputs")
        # exported classifiers carry their class names, so predictions map back to labels
        student.config.id2label = dict(enumerate(labels))
        student.config.label2id = {name: i for i, name in enumerate(labels)}
    collator = TextCollator(loaded.tokenizer, stage.data.max_length,
                            {name: i for i, name in enumerate(labels)} if labels else None)
    return StageParts(
        teacher=teacher, teacher_info=teacher_info, teacher_dir=loaded.path, student=student,
        student_info=student_info, tokenizer=loaded.tokenizer, terms=terms, train_records=train,
        eval_records=evals[: stage.data.eval_limit], collator=collator, labels=labels,
        needs_mlm=any(t.needs_mlm for t in terms), student_taps=student_taps, teacher_taps=teacher_taps,
    )
