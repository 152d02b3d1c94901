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

ST_FILES = ("config_sentence_transformers.json", "sentence_bert_config.json")
# the sentence-transformers modules a student keeps: the model itself, pooling and normalisation, which the engine's
# pooled tap reproduces; a trained module after them (a Dense projection) is the teacher's, sized to its width
ST_KEPT = ("Transformer", "Pooling", "Normalize")


def copy_sentence_transformers_files(teacher_dir: str, out: Path, hidden_size: int) -> tuple[bool, list[str]]:
    """(whether the student loads in sentence-transformers, the teacher's modules left out)."""
    src = Path(teacher_dir)
    if not (src / "modules.json").exists():
        return False, []
    modules = json.loads((src / "modules.json").read_text())
    kept = [m for m in modules if m.get("type", "").rsplit(".", 1)[-1] in ST_KEPT]
    dropped = [f"{m.get('path')} ({m.get('type', '').rsplit('.', 1)[-1]})" for m in modules if m not in kept]
    for name in ST_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    written = []
    for i, module in enumerate(kept):  # folders named by their new places (1_Pooling, 2_Normalize), as usual
        kind, path = module.get("type", "").rsplit(".", 1)[-1], module.get("path", "")
        if path and (src / path).is_dir():
            path = f"{i}_{kind}"
            shutil.copytree(src / module["path"], out / path, dirs_exist_ok=True)
        written.append({**module, "idx": i, "name": str(i), "path": path})
        if kind == "Pooling" and (out / path / "config.json").exists():  # it must know the student's width
            cfg = json.loads((out / path / "config.json").read_text())
            cfg["word_embedding_dimension"] = hidden_size
            (out / path / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "modules.json").write_text(json.dumps(written, indent=2))
    return True, dropped


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
        st, dropped = copy_sentence_transformers_files(teacher_dir, tmp, hidden) if teacher_dir else (False, [])
        # the weights' sizes, so a finished student truncated since (a disk that filled, a partial copy) is not taken
        # for finished by is_complete
        sizes = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.suffix in (".safetensors", ".bin")}
        kept = {"sentence_transformers": st, **({"sentence_transformers_left_out": dropped} if dropped else {})}
        files = sorted(f.name for f in tmp.iterdir() if f.is_file())  # the tokenizer's too: is_complete checks them
        (tmp / "kdistill.json").write_text(json.dumps({**metadata, **kept, "weight_bytes": sizes, "files": files},
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
        record = json.loads((student_dir / "kdistill.json").read_text())
        recorded, files = record.get("weight_bytes", {}), record.get("files", [])
    except (OSError, ValueError, AttributeError):
        return False
    # students saved before the sizes (or the file list) were recorded have none to compare
    return all((student_dir / name).exists() and (student_dir / name).stat().st_size == size
               for name, size in recorded.items()) and all((student_dir / name).exists() for name in files)
