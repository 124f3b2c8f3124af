"""One writer per trace: a lock file next to the trace, held while a process writes it.

HDF5 locks the files it writes, but not everywhere (the lock is often off on network file systems,
``HDF5_USE_FILE_LOCKING=FALSE``), and opening with ``"w"`` truncates a file before HDF5 even tries its
lock: a second trainer given the same path with ``if_exists="overwrite"`` would wipe the first one's
trace. So every writer takes an exclusive ``flock`` on ``<trace>.lock`` *before* opening the trace, and
readers refuse a trace whose lock is held, naming the process that holds it.

The kernel drops a ``flock`` when its process ends, however it ends, so a crashed writer leaves no stale
lock: its lock file may remain, with its process id in it, but an unlocked lock file means nothing and
the next writer takes it over. The lock is advisory (it binds lightning_tda, not other programs) and a
no-op where ``fcntl`` does not exist (Windows), where HDF5's own lock is all there is.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from datetime import datetime, timezone
from pathlib import Path

from lightning_tda.trace.checks import TraceError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def lock_path(trace: str | os.PathLike) -> Path:
    trace = Path(trace)
    return trace.with_name(trace.name + ".lock")


def _open_regular(path: Path, flags: int) -> int:
    """Open ``path`` without blocking (a FIFO in its place would block ``open``) and only if it is a
    regular file; raises ``OSError`` otherwise."""
    fd = os.open(path, flags | os.O_NONBLOCK, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file; remove it (it is where the trace's lock file goes)")
    return fd


def _holder_text(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "another process"


class TraceLock:
    """Exclusive lock on a trace for one writer (a context manager; :meth:`acquire` / :meth:`release`)."""

    def __init__(self, trace: str | os.PathLike, timeout: float = 0.0) -> None:
        self.trace = Path(trace)
        self.path = lock_path(trace)
        self.timeout = timeout
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, timeout: float | None = None) -> None:
        """Take the lock, waiting up to ``timeout`` seconds (default: the constructor's); raises
        :class:`TraceError` naming the holder."""
        if fcntl is None or self._fd is not None:
            return
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                fd = _open_regular(self.path, os.O_RDWR | os.O_CREAT)
            except OSError as err:
                raise TraceError(f"Cannot take the writer lock of the trace {self.trace}: {err}.") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_text(fd)
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise TraceError(
                        f"The trace {self.trace} is being written by {holder} (lock file {self.path}). Two "
                        f"writers would corrupt it: wait for that process to finish, or give this run another "
                        f"trace path."
                    ) from None
                time.sleep(0.1)
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file that its previous holder unlinked while we waited for it
                break
            os.close(fd)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} (since {started})\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> TraceLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def writer_of(trace: str | os.PathLike) -> str | None:
    """Who is writing ``trace`` right now (``"process 123 on host (since ...)"``), or ``None``."""
    path = lock_path(trace)
    if fcntl is None:
        return None
    try:
        fd = _open_regular(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_text(fd)
    except OSError:
        return None
    finally:
        os.close(fd)  # closing also drops a shared lock we took
    return None
