"""CPU time of the mesh's processes, read from ``/proc/<pid>/stat``.

Why from ``/proc`` and not from the services' own metrics: the figure has to include what a
process spends outside our code (interpreter start, the NATS client's reader, the garbage
collector), and it must be readable for ``nats-server`` too, which we did not write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_UTIME = 11
"""Index of ``utime`` (field 14 of proc(5)) once pid and ``(comm)`` are cut off; ``stime``
follows it."""


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds ``pid`` has used so far (0.0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name may hold spaces and parentheses; the fields after its last ")" do not.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[_UTIME]), int(fields[_UTIME + 1])
    return (utime + stime) / _TICKS_PER_S


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


def read_pids(pids_file: Path) -> dict[str, int]:
    """The supervisor's ``pids.json``: child name -> pid."""
    data = json.loads(pids_file.read_text())
    return {str(name): int(pid) for name, pid in data.items()}


def service_of(child: str) -> str:
    """``verifier-snp-2`` -> ``verifier-snp``: replicas are summed under their service."""
    head, _, tail = child.rpartition("-")
    return head if head and tail.isdigit() else child


def snapshot(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far per service (replicas summed)."""
    used: dict[str, float] = {}
    for name, pid in pids.items():
        service = service_of(name)
        used[service] = used.get(service, 0.0) + cpu_seconds(pid)
    return used
