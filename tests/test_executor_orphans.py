"""A killed ``tokenmill run`` must not leave its pool workers or the resource tracker behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; prctl is Linux-only")


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, ppid, start time) of a process, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name in (...) may hold spaces
    return fields[0], int(fields[1]), fields[19]


def _children(ppid: int) -> dict[int, str]:
    """Child pid -> start time; the start time tells a live child from a later process given its pid."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) and st[1] == ppid:
            children[int(entry.name)] = st[2]
    return children


def _alive(pid: int, start: str) -> bool:
    """Zombies count as dead: an orphan waits as one until init (not always a reaper here) collects it."""
    st = _stat(pid)
    return st is not None and st[2] == start and st[0] not in "ZX"


def _wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


PARENT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tmp!r})
    from sleeper import sleep_long
    from tokenmill.executors import LocalExecutor
    LocalExecutor(2, progress=False).map(sleep_long, [{tmp!r} + "/a", {tmp!r} + "/b"])
""")

SLEEPER = textwrap.dedent("""
    import time
    from pathlib import Path

    def sleep_long(marker):
        Path(marker).touch()
        time.sleep(600)
""")


def test_pool_workers_and_resource_tracker_die_with_killed_parent(tmp_path):
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(tmp=str(tmp_path))])
    children: dict[int, str] = {}
    try:
        assert _wait_for(lambda: (tmp_path / "a").exists() and (tmp_path / "b").exists(), 30), \
            "the workers never started their tasks"
        children = _children(parent.pid)
        assert len(children) == 3, f"expected 2 workers and the resource tracker, found {children}"
        parent.kill()
        parent.wait()
        assert _wait_for(lambda: not any(_alive(p, s) for p, s in children.items()), 10), \
            f"still alive 10 s after the parent was killed: {[p for p, s in children.items() if _alive(p, s)]}"
    finally:
        parent.kill()
        parent.wait()
        for pid, start in children.items():
            if _alive(pid, start):
                os.kill(pid, signal.SIGKILL)
