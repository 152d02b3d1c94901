"""OS file locks beside a folder, so that one command at a time trains into it: a killed command leaves none
held. The processes of one distributed launch work in the same folder together: either the launch's first
process holds the lock for all of them (a lock that refuses when held), or none takes it (a lock that waits:
one rank waiting while the others go on would stall the launch)."""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path


@contextlib.contextmanager
def folder_lock(out: Path, suffix: str, when_held, when_unwritable, first_process_holds: bool = False):
    """Holds `.OUT.SUFFIX` beside `out` for the block. If another process holds it, `when_held(lock_file)`
    is called first: it raises to refuse, or returns to wait for the lock. If the lock cannot be made there,
    `when_unwritable(oserror)` raises the error to give. In a distributed launch, `first_process_holds` has
    rank 0 take it for the launch (`when_held` must then raise: the launcher stops the other ranks when rank 0
    exits); without it no rank takes it."""
    # a launcher that sets WORLD_SIZE but no RANK: no process knows it is the first, so none takes the lock
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (first_process_holds and os.environ.get("RANK") == "0"):
        yield
        return
    from filelock import FileLock, Timeout

    out = Path(out).expanduser().resolve()  # one lock per real folder: not one per symlink or spelling (".")
    lock = FileLock(str(out.parent / f".{out.name}.{suffix}"))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:
        if not os.path.exists(lock.lock_file):  # filelock reads "cannot create it" (e.g. in /proc) as "held"
            err = OSError(errno.EACCES, f"no file can be created in {out.parent}")
            when_unwritable(err)
            raise err from None
        when_held(lock.lock_file)
        lock.acquire()
    except OSError as err:
        when_unwritable(err)
        raise
    try:
        yield
    finally:
        lock.release()
