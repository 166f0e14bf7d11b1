"""How many threads a step may use while other programs want the cores too.

llama.cpp's threads meet at a barrier after every operation and spin there. When another
process holds one of the cores, the thread that waits burns the time slice its partner
needed, and decode collapses: 2 threads on a 2-core machine with one busy process beside
them decode at 0.24x their idle speed, where 1 thread keeps ~0.65x. A desktop app always
has something else running, so a session whose thread count was not fixed by the caller
asks, every ``INTERVAL`` seconds, how much CPU the other processes took (the machine's
busy time less this process's own) and uses the cores they leave free.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

INTERVAL = 0.1  # seconds between looks: ~25 us each; a 2-core machine counts 20 ticks of 10 ms in one
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
WINDOW = 0.05  # a fresh look: 10 ticks of /proc/stat on 2 cores
SLACK = 0.35  # a core counts as free when at least 65% of it is: a desktop's background hum takes the rest


def physical_cores() -> int:
    """Cores, not hyperthreads. On Linux read from sysfs: importing psutil costs a model's load 13 ms."""
    if sys.platform == "linux":
        cores = set()
        for topology in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
            try:
                cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
            except OSError:
                continue
        if cores:
            return len(cores)
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class Governor:
    """The thread count for the next step: ``most`` on an idle machine, fewer while others compute.

    ``fixed=True`` keeps ``most`` (the caller chose the count).
    """

    def __init__(self, most: int, *, fixed: bool = False) -> None:
        self.most = self.now = most
        self.fixed = fixed
        self._cpus = os.cpu_count() or most
        self._last: tuple[float, float, float] | None = None

    def update(self) -> int:
        """The count to use now; looks at the machine at most every ``INTERVAL`` seconds."""
        if self.fixed:
            return self.now
        if self._last is not None and time.monotonic() - self._last[0] < INTERVAL:
            return self.now
        return self._look()

    def fresh(self) -> int:
        """``update``, but a look older than ``2 * INTERVAL`` is replaced by one over the next ``WINDOW`` seconds.

        For a choice made once per generation (ONNX Runtime's pool is fixed per model): an average
        since the previous generation would miss a program that started a moment ago.
        """
        if not self.fixed and (self._last is None or time.monotonic() - self._last[0] > 2 * INTERVAL):
            self._last = None
            self._look()
            time.sleep(WINDOW)
            return self._look()
        return self.update()

    def _look(self) -> int:
        t = time.monotonic()
        last = self._last
        busy, own = _machine_busy(), _own_cpu()
        if last is not None:
            others = max(0.0, (busy - last[1]) - (own - last[2])) / (t - last[0])
            free = (self._cpus - others) * self.most / self._cpus  # in physical cores when CPUs are hyperthreads
            self.now = max(1, min(self.most, int(free + SLACK)))
        self._last = (t, busy, own)
        return self.now


def _machine_busy() -> float:
    """CPU seconds the whole machine spent not idle since boot (steal included: another VM had the core)."""
    if sys.platform == "linux":
        with open("/proc/stat", "rb") as f:  # "cpu  user nice system idle iowait irq softirq steal guest guest_nice"
            ticks = [int(x) for x in f.readline().split()[1:]]
        busy = sum(ticks[:3]) + sum(ticks[5:8])  # guest time is inside user and nice already
        return busy / _TICKS
    import psutil

    c = psutil.cpu_times()
    idle = c.idle + getattr(c, "iowait", 0.0)
    guest = getattr(c, "guest", 0.0) + getattr(c, "guest_nice", 0.0)  # counted inside user and nice already
    return sum(c) - idle - guest


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system
