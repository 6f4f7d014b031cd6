"""``OutputLock`` is exclusive: many processes acquiring one folder's lock at the same moment, on a fresh folder and on
a folder holding a dead run's lock, leave exactly one holder every time."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_autobalance.runner.output_lock import OutputFolderInUse, OutputLock

PROCESSES = 8
TRIALS = 20


def _contend(folders: list[str], barrier, results) -> None:
    """One contender: for every folder, wait for the others, try to take its lock, report, hold it until every
    contender has tried, then release."""
    for trial, folder in enumerate(folders):
        lock = OutputLock(folder)
        barrier.wait()
        try:
            lock.acquire()
            got = True
        except OutputFolderInUse:
            got = False
        results.put((trial, got))
        barrier.wait()  # everyone has tried while the winner still holds it
        lock.release()
        barrier.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.skipif(sys.platform == "win32", reason="fork and flock: POSIX only")
@pytest.mark.parametrize("kind", ["fresh", "stale"])
def test_exactly_one_of_many_concurrent_acquirers_holds_the_lock(kind: str, tmp_path: Path) -> None:
    folders = []
    dead = _dead_pid()
    for trial in range(TRIALS):
        folder = tmp_path / f"run{trial}"
        if kind == "stale":  # left by a run that was killed: its process is gone
            folder.mkdir()
            (folder / ".lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname(),
                                                      "started": "earlier", "command": "killed run"}))
        folders.append(str(folder))
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(folders, barrier, results)) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    holders = [0] * TRIALS
    try:
        for _ in range(PROCESSES * TRIALS):
            trial, got = results.get(timeout=60)
            holders[trial] += got
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    assert holders == [1] * TRIALS, holders
    assert not any(Path(f, ".lock").exists() for f in folders)  # every holder released (and removed) it


def test_a_killed_holder_releases_the_lock(tmp_path: Path) -> None:
    """A holder killed with SIGKILL cannot clean up; its lock is free at once and the next run takes it over."""
    script = (f"from lightning_autobalance.runner.output_lock import OutputLock; import time; "
              f"OutputLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputFolderInUse, match=rf"in use by another run \(pid {holder.pid}"):
            OutputLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = OutputLock(tmp_path)
    with lock:
        assert lock.taken_over is not None and lock.taken_over["pid"] == holder.pid
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()
