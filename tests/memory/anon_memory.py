"""A process's anonymous memory (Linux ``RssAnon``), for probes that measure memory in a process of their own.

Anonymous memory is what the process allocates itself; pages of memory-mapped files (the page
cache) are not in it, which is what tells a weight read into memory from one mapped from its file.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]


def anon() -> int:
    """Bytes of anonymous memory this process holds now."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) * 1024
    return 0


def peak_during(fn: Callable[[], T], *, every: float = 0.0005) -> tuple[int, T]:
    """The most anonymous memory above the start while ``fn()`` ran (sampled every ``every`` seconds), and its result."""
    base = anon()
    peak = [base]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(every)

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], anon()) - base, result


def probe_env() -> dict[str, str]:
    """The environment of a probe's process: this repository importable, and freed memory given back to the system at once.

    glibc keeps freed blocks below its mmap threshold for reuse, so anonymous memory would show
    what was held at the most, not what is held now; a fixed, low threshold returns them.
    """
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": path}
