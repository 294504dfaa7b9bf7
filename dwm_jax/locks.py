"""Exclusive locks for directories that one process at a time may write: a training
workdir, a dataset being built.

    with locks.exclusive("workdirs/run", "train.py"):
        ...   # a second process asking for the same lock gets LockedError at once

The lock is ``fcntl.flock`` on a lock file, so the kernel releases it when its holder dies,
however it dies; the file keeps the holder's pid and what it does, for the message to a
second process, and a lock file left by a process that no longer runs is taken over with a
warning that says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os

log = logging.getLogger(__name__)


class LockedError(ValueError):
    """Another running process holds the lock; the message names it and the directory."""


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 200).decode(errors="replace").strip()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def exclusive(lock_path: str, what: str, where: str | None = None):
    """Holds an exclusive lock on ``lock_path`` (created with its folder) for the block.
    ``what`` says what the holder does, ``where`` what the lock protects (for messages).
    Raises LockedError at once when another process holds it."""
    where = where or os.path.dirname(lock_path)
    os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or "another process"
            raise LockedError(f"{where} is in use by {holder}; wait for it to finish, or use "
                              "another directory") from None
        previous = _holder(fd)
        pid = previous.split(" ", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            log.warning("%s: took over the lock left by %s, which no longer runs", where,
                        previous)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} ({what})".encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
