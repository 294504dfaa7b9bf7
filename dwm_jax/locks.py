"""Exclusive locks for directories that one process at a time may write: a training
workdir, a dataset being built.

    with locks.exclusive("workdirs/run", "train.py"):
        ...   # a second process asking for the same lock gets LockedError at once

The lock is ``fcntl.flock`` on a lock file, so the kernel releases it when its holder dies,
however it dies; the file keeps the holder's pid and what it does, for the message to a
second process, and a lock file left by a process that no longer runs is taken over with a
warning that says so.

In a bucket (``gs://``) there are no file locks: the lock is a lease object holding the
holder's name, a token and a heartbeat time. It is created only where none exists (a
create-only precondition where the server honours it, and a read-back of the token either
way), refreshed by a background thread every ``LEASE_REFRESH_S`` while the block runs, and
deleted at its end; a lease not refreshed for ``LEASE_STALE_S`` (its holder died with its
VM) is taken over with a warning that says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid

from dwm_jax import storage

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
    if storage.is_url(lock_path):
        with _lease(lock_path, what, where):
            yield
        return
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


LEASE_REFRESH_S = 30.0
LEASE_STALE_S = 180.0
LEASE_SETTLE_S = 0.5   # between writing a lease and reading it back (a racing writer's turn)


def _read_lease(path: str) -> dict | None:
    try:
        with storage.open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:   # a torn or foreign object: treated as a stale lease
        return {"holder": "an unreadable lease", "heartbeat": 0.0, "token": ""}


def _write_lease(path: str, lease: dict, create_only: bool) -> None:
    """Writes the lease object; with ``create_only``, LockedError where one exists (on
    servers that honour the precondition)."""
    data = json.dumps(dict(lease, heartbeat=time.time())).encode()
    if not create_only:
        storage.write_atomic(path, data)
        return
    try:
        storage.create_only(path, data)
    except FileExistsError:
        raise LockedError(f"{path}: another process created the lease first") from None


def _take(path: str, what: str, where: str) -> dict:
    """Creates this process's lease at ``path`` or raises LockedError naming the holder."""
    found = _read_lease(path)
    if found is not None:
        age = time.time() - float(found.get("heartbeat", 0.0))
        if age < LEASE_STALE_S:
            raise LockedError(f"{where} is in use by {found.get('holder', 'another process')} "
                              f"(its lease {path} was refreshed {age:.0f} s ago); wait for it "
                              "to finish, or use another directory")
        log.warning("%s: took over the lease left by %s, not refreshed for %.0f s", where,
                    found.get("holder", "another process"), age)
        storage.remove(path)
    lease = dict(holder=f"{os.getpid()} on {socket.gethostname()} ({what})",
                 token=uuid.uuid4().hex)
    _write_lease(path, lease, create_only=True)
    time.sleep(LEASE_SETTLE_S)
    now = _read_lease(path)
    if now is None or now.get("token") != lease["token"]:
        holder = (now or {}).get("holder", "another process")
        raise LockedError(f"{where} is in use by {holder}, which took its lease {path} at "
                          "the same time; wait for it to finish, or use another directory")
    return lease


@contextlib.contextmanager
def _lease(path: str, what: str, where: str):
    """The exclusive hold on a bucket folder: a lease object, refreshed while held."""
    lease = _take(path, what, where)
    stop = threading.Event()

    def refresh():
        while not stop.wait(LEASE_REFRESH_S):
            try:
                now = _read_lease(path)
                if now is None or now.get("token") != lease["token"]:
                    log.error("%s: lost the lease %s to %s", where, path,
                              (now or {}).get("holder", "nobody"))
                    return
                _write_lease(path, lease, create_only=False)
            except Exception as e:  # a network hiccup: try again at the next refresh
                log.warning("%s: refreshing the lease %s failed (%s)", where, path, e)

    thread = threading.Thread(target=refresh, name="lease-refresh", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        now = _read_lease(path)
        if now is not None and now.get("token") == lease["token"]:
            storage.remove(path)
