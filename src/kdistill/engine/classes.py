"""A classifier stage's classes: the teacher's own when it already is a classifier, else the data's."""
from __future__ import annotations

import re

from kdistill.config import Stage
from kdistill.data import label_names
from kdistill.errors import DataError, PairingError
from kdistill.models.blueprints import is_blueprint
from kdistill.models.loading import has_classifier_head, load_config


def check_all_or_none_labelled(records: list[dict], prefix: str) -> None:
    """A classifier's batch cannot mix labelled and unlabelled records, and which batches mix depends on the
    shuffle: found here, not some steps into training."""
    unlabelled = [r for r in records if r.get("label") is None]
    if unlabelled and len(unlabelled) < len(records):
        example = str(unlabelled[0].get("text", unlabelled[0].get("image_path", "")))[:60]
        raise DataError(f"{prefix}data.train: {len(unlabelled):,} of its {len(records):,} records have no label (e.g. "
                        f"{example!r}) and the others have one; a batch cannot mix them: label every source (a "
                        f"file's `label:` field), or train on unlabelled records alone with loss terms that need no "
                        f"labels")


def declared_classes(stage: Stage) -> list[str]:
    from kdistill.data.corpora import CORPUS_CLASSES

    specs = [stage.data.train, stage.data.eval]
    sources = [s for spec in specs if spec is not None for s in (spec if isinstance(spec, list) else [spec])]
    return [name for s in sources if s.source in CORPUS_CLASSES for name in CORPUS_CLASSES[s.source]]


def shown(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def class_head(stage: Stage, teacher_ref: str, records: list[dict],
               prefix: str) -> tuple[list[str], dict, list[str] | None]:
    """(class names, the student's head, the teacher's own classes where they are not the data's).

    The classes are the teacher's, in its order, when it already is a classifier of them; else the data's, for a
    new head. A classifier teacher of other classes keeps its own head and the student gets one of the data's
    classes: only terms that read the teacher's features can use it (`check_teacher_classes`)."""
    _, config = load_config(teacher_ref, stage.teacher.trust_remote_code)
    # train and eval (a class seen only in eval still needs an output), and every class a built-in source declares
    labels = label_names(records + [{"label": name} for name in declared_classes(stage)])
    known = [config.id2label[i] for i in range(len(config.id2label))] if getattr(config, "id2label", None) else []
    # a blueprint is a fresh random init: its head takes the data's classes
    blueprint = is_blueprint(stage.teacher.model)
    foreign = None
    if has_classifier_head(config) and not blueprint:
        unknown = sorted(set(labels) - set(known))
        if unknown and all(re.fullmatch(r"LABEL_\d+", name) for name in known):
            raise PairingError(f"{unknown_classes(known, unknown, prefix)}; its config names no classes (transformers' "
                               f"LABEL_i placeholders): write the class names into id2label and label2id of its "
                               f"config.json, in the order its head was trained on")
        if unknown:
            foreign = known
        else:
            labels = known
    if not labels:
        raise DataError(f"{prefix}data has no labels, and the teacher is a classifier of a task not yet learned: "
                        f"give the label field of the data (e.g. label: y), or a teacher trained on the task")
    if len(labels) < 2:  # one class trains to a zero loss and predicts it for everything
        raise DataError(f"{prefix}data has one class ({', '.join(map(repr, labels))}); a classifier needs two or "
                        f"more: check the label field, or the class folders of an image folder")
    # A base model gets a new head with these classes (e.g. to fine-tune a teacher); a student loaded
    # from a directory (a previous, task-agnostic stage) gets the same head.
    return labels, {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                    "label2id": {name: i for i, name in enumerate(labels)}}, foreign


def unknown_classes(known: list[str], unknown: list[str], prefix: str, holders: str = "data") -> str:
    return (f"{prefix}teacher.model is a classifier over {len(known)} classes ({shown(known)}) but {holders} "
            f"{'have' if ' and ' in holders else 'has'} labels it does not know: {shown(unknown)}")


def label_holders(unknown: list[str], blocks: dict[str, list[dict]], prefix: str) -> str:
    """Which data blocks hold these labels ("data.eval", "data.train and data.eval"), for the refusal to name."""
    unknown = set(unknown)
    named = [f"{prefix}data.{block}" for block, records in blocks.items()
             if any(str(r.get("label")) in unknown for r in records)]
    return " and ".join(named) or f"{prefix}data"


PREDICTION_TAPS = ("logits", "cls_logits", "distillation_logits")


def check_teacher_classes(foreign: list[str] | None, labels: list[str], terms, prefix: str,
                          blocks: dict[str, list[dict]] | None = None) -> None:
    """A teacher of other classes than the data's (class_head) serves terms that read its features only; `blocks`
    (train and eval records) lets the refusal name where the teacher's unknown labels are."""
    if foreign is None:
        return
    readers = [t.where for t in terms if any(tap.split("[")[0] in PREDICTION_TAPS for tap in t.teacher_taps())]
    if readers:
        unknown = sorted(set(labels) - set(foreign))
        holders = label_holders(unknown, blocks or {}, prefix)
        raise PairingError(f"{unknown_classes(foreign, unknown, prefix, holders)}; "
                           f"{', '.join(readers)} read{'s' if len(readers) < 2 else ''} the teacher's "
                           f"predictions, which need teacher and data to share their classes (terms that read only its "
                           f"features, such as hidden_mse, vitkd or manifoldkd, take a teacher of other classes)")


def give_head(student, head: dict) -> None:
    """A new classification head of the data's classes on a student built from a teacher of other classes: each
    linear layer writing the old class logits (BERT's and ViT's `classifier`, DeiT's two heads, RoBERTa's
    `classifier.out_proj`) is replaced by a fresh one."""
    from torch import nn

    old = student.config.num_labels
    for name, module in list(student.named_modules()):
        if isinstance(module, nn.Linear) and module.out_features == old and ("classifier" in name or name == "score"):
            parent, _, child = name.rpartition(".")
            setattr(student.get_submodule(parent) if parent else student, child,
                    nn.Linear(module.in_features, head["num_labels"], bias=module.bias is not None))
    for key, value in head.items():
        setattr(student.config, key, value)
    if hasattr(student, "num_labels"):  # transformers' classifiers read their loss's kind from it
        student.num_labels = head["num_labels"]
