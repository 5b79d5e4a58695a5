"""One writer at a time: an exclusive lock on the cache, held for a whole precompute.

`<cache_dir>/.lock` is locked with `fcntl.flock(LOCK_EX)`. Only the holder removes
leftover temporary folders, writes the manifest and commits episodes, so a second
precompute into the same cache WAITS (it says so once, through `on_wait`), then plans its
work against what the first one committed: the first run's episodes are fresh and skipped,
it computes only its own. The kernel drops the lock when its process ends, also on SIGKILL
or a crash, so a dead run never blocks the next one.

flock is advisory and per host: it does not serialise writers on two machines sharing a
network file system (NFS, Lustre). Readers (train, eval, `inspect cache`) take no lock;
they see committed episodes only (each is renamed into place whole).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_NAME = ".lock"


@contextlib.contextmanager
def cache_lock(cache_dir: Path, on_wait: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the cache's writer lock for the body; `on_wait(message)` once when another
    process holds it and this one waits. OSError (a read-only or full cache dir) propagates."""
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():  # mkdir would say "File exists"
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(cache_dir))
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                on_wait(f"waiting for another dprgb precompute (pid {holder}) to finish writing {cache_dir}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        # who holds it, for the message of the next one that waits
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
