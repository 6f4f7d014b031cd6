"""``OutputLock``: one pipeline run per output folder at a time.

The lock is ``<output_dir>/.lock``, held with an exclusive ``fcntl.flock`` for as long as the run lasts, and holding
the holder's process id, host name, start time and command line (for the message a second run gets). Exactly one
process can hold the flock: two runs starting together cannot both get it, and a run that is killed (even with
SIGKILL) releases it, since the kernel drops the locks of a process that ends. Taking over the lock of a dead run is
therefore not a separate step that could race: the flock is simply free.

The holder removes the file when it releases the lock. A process that opened the file just before that and then gets
its flock finds that the file it holds is no longer the one at ``.lock`` (compared by inode) and tries again, so a
lock taken on a removed file never counts.

A lock file whose flock is free is taken over when the process it names is gone. It is respected when it names a
live process of this host (a run of an older version, which locked by creating the file), or a run on another host (a
shared folder whose file system does not pass locks between hosts, where the process cannot be checked): the message
says which file to delete once that run is known to be gone.
Where ``fcntl`` is missing (Windows), the file is created exclusively (``O_CREAT | O_EXCL``) and a left-over one is
taken over only when it names a process of this host that no longer exists.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["OutputFolderInUse", "OutputLock"]


class OutputFolderInUse(RuntimeError):
    """Another live run holds the output folder's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _parse_holder(text: str) -> dict[str, Any] | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


class OutputLock:
    """Holds ``<folder>/.lock`` from ``__enter__`` (or :meth:`acquire`) to ``__exit__`` (or :meth:`release`).

    Args:
        folder: the output folder (created when missing).

    Attributes:
        taken_over: after :meth:`acquire`, what the lock file said when the lock was free but the file was left by
            an earlier run (its holder's record, or ``{"unreadable": True}``); None when there was no file.

    Raises:
        OutputFolderInUse: (on enter) a live run holds the lock, or the file names a run on another host.
        OSError: (on enter) the folder cannot be created or written (a file of that name, no permission).

    Example::

        with OutputLock("runs/digits_lt"):
            ...  # train; a second process entering the same lock meanwhile gets OutputFolderInUse
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self.taken_over: dict[str, Any] | None = None
        self._fd: int | None = None
        self._held = False

    def _record(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)}

    def _in_use(self, holder: dict[str, Any] | None, elsewhere: bool = False) -> OutputFolderInUse:
        if holder is None:
            who = "another run (it has not written its name into the lock yet)"
        else:
            where = f" on host {holder.get('host')}" if elsewhere else ""
            who = (f"another run (pid {holder['pid']}{where}, started {holder.get('started', '?')}: "
                   f"{holder.get('command', '?')})")
        return OutputFolderInUse(f"{self.folder} is in use by {who}. Wait for it to finish or use another "
                                 f"output_dir; if that run is gone, delete {self.path}.")

    def acquire(self) -> None:
        """Takes the lock, or raises :class:`OutputFolderInUse` at once (it does not wait)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover - Windows
            self._acquire_exclusive()
            return
        for _ in range(50):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse_holder(os.read(fd, 65536).decode("utf-8", "replace"))
                os.close(fd)
                raise self._in_use(holder) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the holder removed the file between our open and our flock: try again
                os.close(fd)
                continue
            try:
                self._take(fd)
            except BaseException:
                os.close(fd)
                raise
            return
        raise OutputFolderInUse(f"Could not take the lock {self.path}: other runs keep taking and releasing it.")

    def _take(self, fd: int) -> None:
        """With the flock held: checks what an earlier holder left in the file, then writes this process's record."""
        text = os.read(fd, 65536).decode("utf-8", "replace")
        me = self._record()
        if text.strip():
            holder = _parse_holder(text)
            if holder is not None and holder.get("host") != me["host"]:
                # Its flock may not reach us (a file system shared between hosts): respect it.
                raise self._in_use(holder, elsewhere=True)
            if holder is not None and holder["pid"] != me["pid"] and _alive(holder["pid"]):
                # A live process of this host named in a lock whose flock is free: a run of an older version (which
                # locked by creating the file), respected.
                raise self._in_use(holder)
            self.taken_over = holder or {"unreadable": True}
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        self._fd, self._held = fd, True

    def _acquire_exclusive(self) -> None:  # pragma: no cover - Windows
        me = self._record()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = _parse_holder(self.path.read_text())
                except OSError:
                    holder = None
                if holder is None or holder.get("host") != me["host"] or _alive(holder["pid"]):
                    raise self._in_use(holder, elsewhere=holder is not None and holder.get("host") != me["host"]) \
                        from None
                self.taken_over = holder
                self.path.unlink(missing_ok=True)
                continue
            os.write(fd, json.dumps(me).encode())
            os.close(fd)
            self._held = True
            return
        raise OutputFolderInUse(f"Could not take the lock {self.path}: another run keeps creating it.")

    def release(self) -> None:
        """Removes the lock file and drops the lock (nothing when not held)."""
        if not self._held:
            return
        self.path.unlink(missing_ok=True)  # while still holding the flock: see the module's docstring
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._held = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
