"""Writes that fail because the disk is full, told apart from other write errors, and the half-written
copies that killed writers leave behind.

torch reports a full disk from inside its zip writer as a RuntimeError ("unexpected pos"), safetensors as its
own SafetensorError ("No space left on device"), Python's files as OSError(ENOSPC); either way the user needs to
hear "the disk is full" and what is kept.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError

WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)  # what a write that runs out of disk raises
DISK_FULL_BELOW = 256 * 2**20  # bytes free under which a failed write is put down to the disk
# how a run goes on after space is freed, for every write that can fail this way
RERUN = "run the same command again (`kdistill run` with --resume; `kdistill compare` resumes by itself)"


def raise_if_disk_full(err: Exception, target: Path, tmp: Path, *, error: type[Exception], what: str,
                       fix: str) -> None:
    """Remove the half-written `tmp`; when the disk is full raise `error` naming `target`, the free space and `fix`.
    Otherwise return, and the caller re-raises `err` as it was."""
    shutil.rmtree(tmp, ignore_errors=True)
    free = shutil.disk_usage(target.parent).free
    if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err) or free < DISK_FULL_BELOW:
        raise error(f"could not write {what} {target}: the disk is full ({free / 2**20:.0f} MiB free). {fix}") from err


def replace_folder(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` in `out`'s place. An `out` already there is moved aside first and deleted
    only once replaced: a folder cannot be renamed over a full one, and deleting it first would leave nothing
    if the rename then failed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_abandoned_copies(out: Path, marker: str = "tmp") -> None:
    """Half-written copies of ``out`` left by a process killed while writing it (``.NAME.MARKER-PID[-...]`` with PID no
    longer running): each is a whole model's (or store's) worth of disk, and no later write of the same name would
    reuse it."""
    if not out.parent.exists():
        return
    for stale in out.parent.glob(f".{out.name}.{marker}-*"):
        pid = stale.name[len(f".{out.name}.{marker}-"):].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0 only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:  # alive, another user's
            continue
