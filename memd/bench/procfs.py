"""What ``/proc`` says about a measured child process: CPU seconds of its process tree, peak RSS.

Linux ``/proc`` (``proc(5)``): ``/proc/<pid>/stat`` fields 4 (ppid) and 14–17 (utime, stime,
cutime, cstime, in clock ticks), and ``VmHWM`` of ``/proc/<pid>/status`` (peak resident set, kB).
"""

from __future__ import annotations

import os

#: Clock ticks per second of the ``stat`` CPU fields.
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_stat(pid: int) -> tuple[int, float] | None:
    """``(ppid, CPU seconds incl. reaped children)`` of ``pid``, or ``None`` when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    # fields[0] is field 3 (state); ppid is field 4, utime..cstime are fields 14..17.
    return int(fields[1]), sum(int(x) for x in fields[11:15]) / CLK_TCK


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds of ``pid`` and its live descendants (reaped ones are in its ``cutime``), or
    ``None`` when ``pid`` is gone."""
    root = proc_stat(pid)
    if root is None:
        return None
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {pid: root[1]}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == pid:
            continue
        st = proc_stat(int(name))
        if st is not None:
            children.setdefault(st[0], []).append(int(name))
            cpu[int(name)] = st[1]
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        total += cpu.get(p, 0.0)
        stack.extend(children.get(p, []))
    return total


def vm_hwm_mb(pid: int) -> float | None:
    """Peak RSS (``VmHWM``) of ``pid`` in MB, or ``None`` when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
