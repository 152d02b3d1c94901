"""What a checkpoint must match to be resumed: a hash of the stage's settings, kept stable across versions (fields
added later hash as if absent at their default) and across spellings of one file."""
from __future__ import annotations

import hashlib
import json

from kdistill.config import Stage


# Fields added to a stage after checkpoints were written, with the default that trains as before they existed.
ADDED_LATER = [("data", "loss_on", "all")]
ADDED_LATER_TO_TERMS = [("logit_kd", "tail", "bucket"), ("hidden_mse", "layer_norm", False),
                        ("hidden_cosine", "layer_norm", False)]  # (loss type, field, default)


def stage_hash(stage: Stage, legacy: bool = False, real_paths: bool = True) -> str:
    """What a checkpoint must match to be resumed: the stage's settings without its bookkeeping (how often it
    evaluates, logs and saves: recipe_diff.BOOKKEEPING), which changes no weight. ``legacy``: the hash of
    checkpoints written before 2026-11-28, over every field. ``real_paths``: data files, teachers and students
    that exist hash as their real paths, so the same file named relative or absolute is the same stage; a
    checkpoint keeps the hash with and without it (without: a run moved together with its relatively named data)."""
    from kdistill.recipe_diff import BOOKKEEPING

    dumped = stage.model_dump(mode="json")
    if real_paths:
        with_real_paths(dumped)
    for section, field, default in ADDED_LATER:  # at its default, a newer field hashes as if it were not there
        if dumped[section].get(field) == default:
            del dumped[section][field]
    for term in dumped["losses"]:
        for kind, field, default in ADDED_LATER_TO_TERMS:
            if isinstance(term, dict) and term.get("type") == kind and term.get(field) == default:
                del term[field]
    if not legacy:
        dumped["train"] = {k: v for k, v in dumped["train"].items() if k not in BOOKKEEPING}
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]


def with_real_paths(dumped: dict) -> None:
    """The dumped stage's local files and folders (data paths, teacher and student models, a store) as their
    real paths, in place; names that are not paths on this machine stay as they are."""
    import os

    def real(value):
        return os.path.realpath(value) if isinstance(value, str) and os.path.exists(value) else value

    for part in ("train", "eval"):
        sources = (dumped.get("data") or {}).get(part)
        for source in sources if isinstance(sources, list) else [sources]:
            if isinstance(source, dict) and source.get("path"):
                source["path"] = real(source["path"])
    for section, field in (("teacher", "model"), ("teacher", "path"), ("student", "model")):
        if isinstance(dumped.get(section), dict) and dumped[section].get(field):
            dumped[section][field] = real(dumped[section][field])
