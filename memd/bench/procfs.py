"""What ``/proc`` says about a measured child process: CPU seconds of its process tree, peak RSS.

Linux ``/proc`` (``proc(5)``): ``/proc/<pid>/stat`` fields 4 (ppid) and 14–17 (utime, stime,
cutime, cstime, in clock ticks), and ``VmHWM`` of ``/proc/<pid>/status`` (peak resident set, kB).

A child's peak RSS is read by the child itself as it exits (:func:`self_reporting_memd_argv`), not
from ``wait4``'s ``ru_maxrss``: on Linux that figure keeps the resident set the child had at the
fork, a copy of its parent's (inside ``memd bench`` every figure would read the harness's ~230 MB).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

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


#: ``python -c`` program: ``memd`` with ``argv[2:]``, then the process's own ``VmHWM`` (kB) written
#: to ``argv[1]`` as it exits, whatever the exit code.
_REPORTING_CHILD = """
import sys
report = sys.argv.pop(1)
def vm_hwm_kb():
    try:
        with open("/proc/self/status") as f:
            return next((line.split()[1] for line in f if line.startswith("VmHWM:")), "")
    except OSError:
        return ""
try:
    from memd.cli import main
    code = main(sys.argv[1:])
finally:
    with open(report, "w") as f:
        f.write(vm_hwm_kb())
sys.exit(code)
"""


def self_reporting_memd_argv(report: Path, *args: str) -> list[str]:
    """``python -c … memd ARGS`` with this interpreter: the child writes its own peak RSS
    (``VmHWM``, kB) to ``report`` as it exits; read it with :func:`reported_peak_mb`.

    ``-c`` puts the working directory first on ``sys.path``: run the child elsewhere than a
    checkout that is not the one under test.
    """
    return [sys.executable, "-c", _REPORTING_CHILD, str(report), *args]


def reported_peak_mb(report: Path) -> float | None:
    """The peak RSS in MB (MiB) a :func:`self_reporting_memd_argv` child wrote, or ``None`` when
    it wrote none (no ``/proc/self/status``, or it was killed)."""
    try:
        return int(report.read_text()) / 1024
    except (OSError, ValueError):
        return None
