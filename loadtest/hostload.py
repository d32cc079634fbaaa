"""How busy the machine is: load average and the CPU used by processes outside this run,
before and during a step (the shared small box makes other processes part of a result)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

# --------------------------------------------------------------------------- CPU accounting

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: str) -> tuple[int, int] | None:
    """(ppid, utime + stime in ticks) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall time, busy CPU-seconds of the machine, CPU-seconds of this process tree: self,
    waited-for children and live descendants).  None where /proc is missing."""
    import resource

    try:
        cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in cpu]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # minus idle, iowait
    procs: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(entry)
            if stat is not None:
                procs[int(entry)] = stat
    tree, frontier = set(), [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in procs.items() if ppid == parent]
        tree.update(children)
        frontier.extend(children)
    ours = sum(procs[pid][1] for pid in tree) / _CLK_TCK
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        ours += usage.ru_utime + usage.ru_stime
    return time.monotonic(), busy / _CLK_TCK, ours


def others_cores(before: tuple | None, after: tuple | None) -> float:
    """Cores kept busy by processes outside this tree between two snapshots."""
    if before is None or after is None or after[0] <= before[0]:
        return math.nan
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def wait_for_quiet(
    max_load: float | None, max_wait_s: float, sample_s: float = 5.0, busy_cores: float = 0.5
) -> dict[str, object]:
    """Before a measured run: while the 1-minute load is above ``max_load`` *and* other
    processes keep more than ``busy_cores`` busy (our own idle stack does not count; the
    load average still carries our previous step), sleep 60 s and re-check, at most
    ``max_wait_s``.  Returns what was seen, for the results."""
    waited = 0.0
    others = math.nan
    while True:
        load = loadavg()
        if max_load is None or not load or load[0] <= max_load:
            break
        before = cpu_snapshot()
        time.sleep(sample_s)
        others = others_cores(before, cpu_snapshot())
        if not math.isnan(others) and others <= busy_cores:
            break
        if waited >= max_wait_s:
            print(f"run_load: still busy after {waited:.0f}s (load {load}); running anyway")
            break
        print(f"run_load: load {load}, others {others:.2f} cores busy: waiting 60 s", flush=True)
        time.sleep(60)
        waited += 60 + sample_s
    return {"loadavg": loadavg(), "waited_s": waited, "others_cores_idle": round(others, 3)}
