"""Peak memory of a process tree, sampled from /proc (PSS, so shared pages such as Ray's object
store are counted once)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    return kids


def tree_pss_bytes(root: int) -> int:
    kids, total, todo = _children(), 0, [root]
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total


class PeakMemory:
    """``with PeakMemory() as m: ...``; then ``m.peak`` is the highest PSS (bytes) of this process
    and all its descendants, sampled every ``interval`` seconds."""

    def __init__(self, pid: int | None = None, interval: float = 0.2) -> None:
        self.pid, self.interval, self.peak = pid or os.getpid(), interval, 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss_bytes(self.pid))
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, tree_pss_bytes(self.pid))
