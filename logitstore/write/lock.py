"""One job per store: a writer holds an exclusive lock on ``.<name>.lock`` beside the store
for as long as it writes, so a second job started on the same store is refused instead of
silently writing the same shards (FORMAT.md §6.5: two writers of one shard lose data).

The lock is ``flock`` on a local file: the kernel releases it when its process dies, so a
killed job never leaves a stale lock behind and the next run resumes at once. Under torchrun
rank 0 holds it for the whole job. On object storage, where there is no ``flock``, the job
holds a lease object under the store's prefix instead (:mod:`.lease`): taken with a
conditional put, renewed while the job runs, run out some time after a kill.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import StoreExistsError
from ..format.storage import store_path
from .lease import object_lease

__all__ = ["lock_path", "store_lock"]

# Locks this process holds, by path (generate holds the lock and then calls capture, which
# asks for it again: the inner block is a no-op).
_HELD: set[str] = set()


def lock_path(out: str | os.PathLike[str]) -> Path | None:
    """Where the lock of the store at ``out`` lives; ``None`` for a URL (no local lock)."""
    if "://" in str(out):
        return None
    out = Path(out)
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def store_lock(out: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the store's lock for the ``with`` block.

    Raises:
        StoreExistsError: another process holds it (the message names the process and host
            that took it, and when).
    """
    path = lock_path(out)
    key = str(store_path(out)) if path is None else str(path.resolve())
    if key in _HELD:
        yield
        return
    if path is None:  # object storage: a lease object instead of a flock (FORMAT.md §6.6)
        _HELD.add(key)
        try:
            with object_lease(key):
                yield
        finally:
            _HELD.discard(key)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise StoreExistsError(
            f"another job is writing {str(out)!r} ({holder}); two writers of one store lose "
            f"data. Wait for it to finish, or stop it and run this command again to resume "
            f"(lock: {str(path)!r})"
        ) from None
    os.ftruncate(fd, 0)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        os.close(fd)  # releases the flock
