"""``OutputLock``: one pipeline run per output folder at a time.

The lock is a file, ``<output_dir>/.lock``, created exclusively (``O_CREAT | O_EXCL``) and holding the holder's
process id, host name, start time and command line. A second run on the same folder is refused with a message
that names the holder. A lock left by a run that was killed is recognised and taken over: on the same host, its
process no longer exists; a lock file that cannot be read is treated as left over as well. A lock held on another
host cannot be checked from here: the message says which file to delete once that run is known to be gone.
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


class OutputLock:
    """Holds ``<folder>/.lock`` from ``__enter__`` to ``__exit__``.

    Args:
        folder: the output folder (created when missing).

    Raises:
        OutputFolderInUse: (on enter) a live run holds the lock.

    Example::

        with OutputLock("runs/digits_lt"):
            ...  # train; a second process entering the same lock meanwhile gets OutputFolderInUse
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self.taken_over: dict[str, Any] | None = None
        self._held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and holder["pid"] != os.getpid():
                    same_host = holder.get("host") == me["host"]
                    if not same_host or _alive(holder["pid"]):
                        where = "" if same_host else f" on host {holder.get('host')}"
                        raise OutputFolderInUse(
                            f"{self.folder} is in use by another run (pid {holder['pid']}{where}, started "
                            f"{holder.get('started', '?')}: {holder.get('command', '?')}). Wait for it to finish or "
                            f"use another output_dir; if that run is gone, delete {self.path}.") from None
                # Left by a run that no longer exists (or unreadable, or our own): take it over.
                self.taken_over = holder or {"unreadable": True}
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self._held = True
            return
        raise OutputFolderInUse(f"Could not take the lock {self.path}: another run keeps creating it.")

    def release(self) -> None:
        if self._held:
            holder = self._holder()
            if holder is None or holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
