"""Resumable checkpoints: student + projectors, optimizer, scheduler, RNG states, step and method state.

Weights go to safetensors, optimizer/scheduler tensors to torch files read back with
`weights_only=True`, RNG states to JSON, so loading a checkpoint never unpickles code. A manifest
with SHA-256 checksums lets a corrupt or foreign directory be refused with a clear message.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from kdistill.engine.disk import RERUN, WRITE_ERRORS, raise_if_disk_full
from kdistill.errors import CheckpointError

FORMAT = "kdistill-checkpoint"
VERSION = 1


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout and masks drawn on the GPU
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(directory: Path, *, model, optimizer, scheduler, step: int, stage: str, recipe_hash: str,
                    method_state: dict, rank: int = 0, world: int = 1, is_main: bool = True, barrier=lambda: None,
                    extras: dict | None = None, path_hash: str | None = None, elapsed_s: float = 0.0) -> Path:
    """Write to `<dir>.tmp` and rename, so a directory named step-N is always complete. `path_hash`: the stage's
    hash over the real paths of its files, kept beside `recipe_hash` (over their spelling), so that a resume
    matches either: another spelling of the same files, or the same spelling of files moved with the run."""
    tmp = directory.with_name(directory.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        (tmp / f"rng-{rank}.json").write_text(json.dumps(rng_state()))
    except OSError as err:
        full_disk(err, directory, tmp)
        raise
    barrier()
    if is_main:
        try:
            save_model(model, str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            for name, (module, module_optimizer) in (extras or {}).items():  # e.g. ProKT's trained teacher
                save_model(module, str(tmp / f"{name}.safetensors"))
                torch.save(module_optimizer.state_dict(), tmp / f"{name}-optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "method": method_state,
                                                        "elapsed_s": round(elapsed_s, 3)}))
            files = {p.name: sha256(p) for p in sorted(tmp.iterdir())}
            manifest = {"format": FORMAT, "version": VERSION, "stage": stage, "step": step,
                        "world": world, "recipe_hash": recipe_hash, "files": files,
                        **({"path_hash": path_hash} if path_hash else {})}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        except WRITE_ERRORS as err:
            full_disk(err, directory, tmp)
            raise
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    barrier()
    return directory


def full_disk(err: Exception, directory: Path, tmp: Path) -> None:
    """The half-written directory goes, the earlier checkpoints stay; a full disk is named as such."""
    raise_if_disk_full(
        err, directory, tmp, error=CheckpointError, what="checkpoint",
        fix="Free some space (lower train.keep_checkpoints, or delete the checkpoints/ folders of finished runs) and "
            f"{RERUN}: it continues from the last complete checkpoint")


def read_manifest(directory: Path) -> dict:
    path = directory / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory} is not a kdistill checkpoint (no manifest.json; it was damaged or put "
                              f"there by hand); delete it to resume from an earlier checkpoint") from None
    except ValueError:  # not JSON, or not even UTF-8 text
        raise CheckpointError(f"{path} is corrupt (not JSON); delete {directory} to resume from an earlier checkpoint") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{directory} is not a kdistill checkpoint (format {manifest.get('format')!r}); delete "
                              f"it to resume from an earlier checkpoint")
    missing = [key for key in ("files", "recipe_hash") if key not in manifest]
    if missing:
        raise CheckpointError(f"{path} is corrupt (no {', '.join(missing)}); delete {directory} to resume from an "
                              f"earlier checkpoint")
    return manifest


def written_by(manifest: dict, accepted) -> bool:
    """Whether a checkpoint's stage hashes (over the spelling of its files, and over their real paths) include one
    of `accepted`."""
    return bool({manifest["recipe_hash"], manifest.get("path_hash")} & set(accepted))


def verify(directory: Path, recipe_hash: str | tuple[str, ...] | None = None) -> dict:
    """The manifest of a complete, undamaged checkpoint written by a stage whose hash is ``recipe_hash`` (or one
    of them)."""
    manifest = read_manifest(directory)
    for name, digest in manifest["files"].items():
        path = directory / name
        if not path.exists() or sha256(path) != digest:
            what = "missing" if not path.exists() else "damaged (its checksum differs from the manifest's)"
            raise CheckpointError(
                f"checkpoint {directory} is corrupt: {name} is {what}; delete this directory to resume from the "
                f"checkpoint before it (or from the stage's first step, if it was the only one)"
            )
    accepted = (recipe_hash,) if isinstance(recipe_hash, str) else recipe_hash
    if accepted is not None and not written_by(manifest, accepted):
        raise CheckpointError(
            f"checkpoint {directory} was written by a different stage configuration; "
            f"resume with the recipe that wrote it, or start a new run with another --output"
        )
    return manifest


class CheckpointMismatch(CheckpointError):
    """A sound checkpoint whose tensors or optimizer state do not fit the model and optimizer built now."""


def load_checkpoint(directory: Path, *, model, optimizer, scheduler, rank: int = 0,
                    recipe_hash: str | tuple[str, ...] | None = None,
                    extras: dict | None = None) -> dict:
    verify(directory, recipe_hash)
    try:
        missing, unexpected = load_model(model, str(directory / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise CheckpointMismatch(
                f"checkpoint {directory} does not fit this student: missing {sorted(missing)[:3]}, unexpected "
                f"{sorted(unexpected)[:3]}"
            )
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
        for name, (module, module_optimizer) in (extras or {}).items():
            load_model(module, str(directory / f"{name}.safetensors"))
            module_optimizer.load_state_dict(torch.load(directory / f"{name}-optimizer.pt", weights_only=True))
    except (RuntimeError, ValueError, KeyError, FileNotFoundError) as err:
        raise CheckpointMismatch(f"checkpoint {directory} does not fit this run: {str(err).splitlines()[0]}") from None
    rng_file = directory / f"rng-{rank}.json"
    if rng_file.exists():
        set_rng_state(json.loads(rng_file.read_text()))
    return json.loads((directory / "state.json").read_text())


def list_checkpoints(root: Path) -> list[Path]:
    if not root.exists():
        return []
    # only step-<digits>: a step-N.tmp being written, or a folder a user made beside them (step-backup), is not one
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()),
                  key=lambda p: int(p.name[5:]))


def prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def saved_loss_terms(run_dir: Path, stage: str) -> list[str] | None:
    """The loss term types of `stage` in the recipe the run was started (or last accepted) with, None if unknown."""
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
        stages = saved["stages"] if isinstance(saved, dict) and "stages" in saved else [saved]
        block = next(s for s in stages if isinstance(s, dict) and s.get("name", "main") == stage)
        return [term["type"] for term in block.get("losses", [])]
    except (OSError, yaml.YAMLError, KeyError, TypeError, StopIteration):
        return None
