"""The finished student as a standard Hugging Face directory, written atomically.

Only the student is saved (projectors and other training-only parts are not), with the tokenizer,
the sentence-transformers files when the teacher had them, and `kdistill.json` saying how it was made.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kdistill.engine.disk import RERUN, WRITE_ERRORS, raise_if_disk_full, remove_abandoned_copies, replace_folder
from kdistill.errors import OutputError

ST_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")
ST_DIRS = ("1_Pooling", "2_Normalize")


def copy_sentence_transformers_files(teacher_dir: str, out: Path, hidden_size: int) -> bool:
    src = Path(teacher_dir)
    if not (src / "modules.json").exists():
        return False
    for name in ST_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    for name in ST_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, out / name, dirs_exist_ok=True)
    pooling = out / "1_Pooling" / "config.json"
    if pooling.exists():  # the pooling layer must know the student's width
        cfg = json.loads(pooling.read_text())
        cfg["word_embedding_dimension"] = hidden_size
        pooling.write_text(json.dumps(cfg, indent=2))
    return True


def save_student(student, tokenizer, out_dir: str | Path, *, teacher_dir: str | None, metadata: dict) -> Path:
    """Write into a temporary sibling, then rename: a directory at `out_dir` is always complete."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    remove_abandoned_copies(out)
    remove_abandoned_copies(out, "old")  # a writer killed between the two renames below
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        student.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        hidden = getattr(student.config, "hidden_size", None) or getattr(student.config, "n_embd", None)
        st = bool(teacher_dir) and copy_sentence_transformers_files(teacher_dir, tmp, hidden)
        # the weights' sizes, so a finished student truncated since (a disk that filled, a partial copy) is not taken
        # for finished by is_complete
        sizes = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.suffix in (".safetensors", ".bin")}
        (tmp / "kdistill.json").write_text(json.dumps({**metadata, "sentence_transformers": st, "weight_bytes": sizes},
                                                      indent=2, default=str))
    except WRITE_ERRORS as err:
        raise_if_disk_full(
            err, out, tmp, error=OutputError, what="the student",
            fix=f"Free some space and {RERUN}: training continues from the stage's last checkpoint, and a finished "
                "stage's student is kept")
        raise
    replace_folder(tmp, out)
    return out


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def is_complete(student_dir: Path) -> bool:
    """A student is written whole (save_student renames it into place); one missing its weights was damaged
    since, and counts as not finished, so a resumed run or a cached teacher writes it again."""
    if not ((student_dir / "kdistill.json").exists() and (student_dir / "config.json").exists()
            and any((student_dir / name).exists() for name in WEIGHT_FILES)):
        return False
    try:
        recorded = json.loads((student_dir / "kdistill.json").read_text()).get("weight_bytes", {})
    except (OSError, ValueError, AttributeError):
        return False
    # students saved before the sizes were recorded have none to compare
    return all((student_dir / name).exists() and (student_dir / name).stat().st_size == size
               for name, size in recorded.items())
