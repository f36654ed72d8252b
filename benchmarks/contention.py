"""Whether the host was busy while a row ran: the CPU time other processes took, from ``/proc/stat`` and this
process's children's CPU time, and a wait for a quiet host before a row.

A row's worker is a child process of the bench; the machine's busy time over the row's wall time, less the
CPU time the bench's children took (``resource.getrusage(RUSAGE_CHILDREN)``), is what everything else on the
host took: ``other_cpu``, a fraction of the whole machine (1.0: every core busy with other work). The load
average alone cannot tell: the bench's own worker raises it. Linux only (``/proc/stat``); elsewhere the figures
are None and nothing is flagged.

A measurement that runs inside the process it measures (the server benchmark's server threads) takes its
snapshots with ``own=True``: that process's own CPU time is then the measuring side's too, not other work.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BUSY_OTHER_CPU = 0.10  # a row is flagged when other work took more than a tenth of the machine meanwhile


@dataclass(frozen=True)
class Snapshot:
    busy_s: float | None  # the machine's busy CPU seconds since boot (None: no /proc/stat)
    children_s: float  # CPU seconds of the measuring side: this process's finished children (own=True: and itself)
    wall: float  # time.monotonic()


def _busy_seconds() -> float | None:
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def snapshot(own: bool = False) -> Snapshot:
    """The machine's busy time and the measuring side's CPU time now: this process's finished children's, and
    with ``own`` this process's own as well (a measurement running in this process)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = ru.ru_utime + ru.ru_stime
    if own:
        me = resource.getrusage(resource.RUSAGE_SELF)
        ours += me.ru_utime + me.ru_stime
    return Snapshot(_busy_seconds(), ours, time.monotonic())


def other_cpu(before: Snapshot, after: Snapshot) -> float | None:
    """The fraction of the machine's CPU that processes other than the measuring side (the bench's children that
    finished in between; with ``own`` snapshots, this process too) used between the two snapshots (None without
    /proc/stat or an empty interval)."""
    wall = after.wall - before.wall
    if before.busy_s is None or after.busy_s is None or wall <= 0:
        return None
    cores = os.cpu_count() or 1
    other = (after.busy_s - before.busy_s) - (after.children_s - before.children_s)
    return max(0.0, other / (wall * cores))


def host_busy(interval_s: float = 2.0) -> float | None:
    """Other processes' share of the machine over ``interval_s`` while the bench runs nothing."""
    a = snapshot()
    time.sleep(interval_s)
    return other_cpu(a, snapshot())


def wait_quiet(threshold: float, timeout_s: float, emit: Callable[..., Any] = lambda *a, **k: None,
               interval_s: float = 2.0) -> tuple[float, float | None]:
    """Wait until other processes use at most ``threshold`` of the machine (measured over ``interval_s``), or
    ``timeout_s`` passed: (seconds waited, the last share measured; None where it cannot be measured)."""
    t0 = time.monotonic()
    while True:
        share = host_busy(interval_s)
        waited = time.monotonic() - t0
        if share is None or share <= threshold:
            return waited, share
        if waited >= timeout_s:
            emit("quiet", f"the host stayed busy ({share:.0%} of its CPU in other work) for {waited:.0f} s; "
                          "measuring anyway (the row is flagged)")
            return waited, share
        emit("quiet", f"waiting for a quiet host: {share:.0%} of its CPU in other work (at most "
                      f"{threshold:.0%} wanted)")
