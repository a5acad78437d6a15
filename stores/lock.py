"""StoreLock: one build at a time on a store directory.

A build holds `<store>/build.lock` for as long as it writes: an exclusive `fcntl.flock` on that
file, which also holds the holder's pid, host and start time as JSON. flock is atomic, works on
local file systems and NFSv4, and the kernel drops it when the holder dies however it dies, so a
lock left by a killed build is free again at once: the next build takes it over and says whose
it was. A lock that is still held names its holder in a one-line StoreError; if that holder is a
dead process on this host whose children (DataLoader workers that inherited the descriptor) are
still exiting, the new build waits a few seconds for them first.

The lock is per process: acquiring it again in the process that holds it returns the same lock
(a writer, a repair and the build's own checks share it), and `release()` gives it up for all.
Under torchrun, rank 0 takes it and the other ranks open the store without it.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from .errors import StoreError

LOCK_NAME = "build.lock"
_HELD: dict[str, "StoreLock"] = {}
_GUARD = threading.Lock()
STALE_WAIT_S = 15.0  # how long to wait for the exiting children of a dead holder


def _host() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one owned by someone else counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
        h = json.loads(data.decode("utf-8")) if data.strip() else {}
        return h if isinstance(h, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


def _describe(h: dict) -> str:
    if not h:
        return "an unknown process"
    since = f", since {h['since']}" if h.get("since") else ""
    return f"pid {h.get('pid', '?')} on host {h.get('host', '?')}{since}"


class StoreLock:
    """The exclusive build lock of one store directory (see the module docstring)."""

    def __init__(self, store: Path, fd: int):
        self.store = store
        self.path = store / LOCK_NAME
        self._fd: int | None = fd
        self._pid = os.getpid()  # a forked child (a DataLoader worker) never removes its parent's lock

    @classmethod
    def acquire(cls, store: str | os.PathLike) -> "StoreLock":
        """Take the lock of `store` (creating the directory), or raise StoreError naming the holder."""
        store = Path(store)
        key = os.path.realpath(store)
        with _GUARD:
            held = _HELD.get(key)
            if held is not None and held._fd is not None and held._pid == os.getpid():
                return held
            store.mkdir(parents=True, exist_ok=True)
            path = store / LOCK_NAME
            deadline = time.monotonic() + STALE_WAIT_S
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    holder = _read_holder(fd)
                    os.close(fd)
                    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                        print(f"store {store}: warning: its file system cannot lock {path} ({e.strerror}); "
                              "building without the lock: do not start a second build on this store", flush=True)
                        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
                        break
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise StoreError(f"store {store}: cannot lock {path}: {e}") from None
                    dead_here = holder.get("host") == _host() and isinstance(holder.get("pid"), int) \
                        and not pid_alive(holder["pid"])
                    if dead_here and time.monotonic() < deadline:
                        time.sleep(0.2)  # its worker processes are still exiting
                        continue
                    raise StoreError(
                        f"store {store}: another build holds its lock {path} ({_describe(holder)}); wait for it to "
                        "finish or stop it, then rerun (two builds writing one store would leave it unusable)"
                    ) from None
                try:  # the holder may have removed the file between our open and flock: lock the new one
                    if os.fstat(fd).st_ino != os.stat(path).st_ino:
                        raise FileNotFoundError
                except FileNotFoundError:
                    os.close(fd)
                    continue
                break
            old = _read_holder(fd)
            if old:
                state = "no longer running" if old.get("host") == _host() and isinstance(old.get("pid"), int) \
                    and not pid_alive(old["pid"]) else "its lock was free"
                print(f"store {store}: taking over the stale build lock of {_describe(old)} ({state})", flush=True)
            me = {"pid": os.getpid(), "host": _host(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode("utf-8"), 0)
            os.fsync(fd)
            lock = cls(store, fd)
            _HELD[key] = lock
            return lock

    @classmethod
    def check(cls, store: str | os.PathLike) -> None:
        """Raise StoreError naming the holder if another process holds the lock of `store`; creates
        nothing (a build calls it first, so that a second build fails before loading any model)."""
        store = Path(store)
        path = store / LOCK_NAME
        held = _HELD.get(os.path.realpath(store))
        if held is not None and held._fd is not None and held._pid == os.getpid():
            return
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                dead_here = holder.get("host") == _host() and isinstance(holder.get("pid"), int) \
                    and not pid_alive(holder["pid"])
                if not dead_here:
                    raise StoreError(
                        f"store {store}: another build holds its lock {path} ({_describe(holder)}); wait for it to "
                        "finish or stop it, then rerun (two builds writing one store would leave it unusable)"
                    ) from None
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and drop the lock (no-op when already released)."""
        with _GUARD:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            _HELD.pop(os.path.realpath(self.store), None)
            if self._pid != os.getpid():
                os.close(fd)
                return
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD.values()):
        try:
            lock.release()
        except OSError:
            pass
