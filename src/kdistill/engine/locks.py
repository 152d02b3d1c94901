"""OS file locks beside a folder, so that one command at a time trains into it: a killed command leaves none
held. The processes of one distributed launch work in the same folder together, so they take none (a rank
waiting on another's lock would stall the launch)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def folder_lock(out: Path, suffix: str, when_held, when_unwritable):
    """Holds `.OUT.SUFFIX` beside `out` for the block. If another process holds it, `when_held(lock_file)`
    is called first: it raises to refuse, or returns to wait for the lock. If the lock cannot be made there,
    `when_unwritable(oserror)` raises the error to give."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield
        return
    from filelock import FileLock, Timeout

    lock = FileLock(str(out.parent / f".{out.name}.{suffix}"))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:
        when_held(lock.lock_file)
        lock.acquire()
    except OSError as err:
        when_unwritable(err)
        raise
    try:
        yield
    finally:
        lock.release()
