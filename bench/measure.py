"""Where the CPU went during one measured run, read from /proc (Linux only).

The machine has few cores and other work may run on it, so every sample records the CPU seconds of each
party (our process, the dump tools, PostgreSQL, the Prefect API, SeaweedFS) and of the whole machine; what
nobody of ours used is reported as "other", which flags a run disturbed by something else.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on; comm may hold spaces


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in threads:  # a child belongs to the thread that forked it
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as handle:
                found += [int(p) for p in handle.read().split()]
        except OSError:
            pass
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its reaped children and its live descendants.

    A child that exits between two readings moves from "live" into the parent's cutime/cstime, so the
    difference of two readings is right as long as the parent reaps its children (PostgreSQL does).
    """
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return ticks / CLOCK_TICKS + sum(tree_cpu(child) for child in _children(pid))


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def machine_busy() -> float:
    """CPU seconds all cores spent not idle since boot."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def busy_cores(seconds: float = 1.0) -> float:
    """How many cores the whole machine kept busy over the next ``seconds``."""
    before = machine_busy()
    time.sleep(seconds)
    return (machine_busy() - before) / seconds


def status_kib(pid: int | str, name: str) -> int:
    """A ``VmHWM``/``VmRSS``-style line of /proc/<pid>/status, in KiB (0 if absent)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


@dataclass
class CpuMeter:
    """Snapshots of named process trees and of the machine; ``delta`` gives CPU seconds per name."""

    services: dict[str, int] = field(default_factory=dict)
    _start: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        self._start = self._read()

    def delta(self) -> dict[str, float]:
        now = self._read()
        return {name: round(now[name] - self._start.get(name, 0.0), 2) for name in now}

    def _read(self) -> dict[str, float]:
        values = {name: tree_cpu(pid) for name, pid in self.services.items()}
        values["machine"] = machine_busy()
        return values


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
