"""How PyTorch's OpenMP threads wait between operations, chosen before torch is imported.

A decoder step issues many small operations one after another. Between two of them OpenMP's
worker threads either spin (the library default: spin a while, then sleep) or sleep at once
(``OMP_WAIT_POLICY=PASSIVE``). Measured on the quickstart training step (2-core EPYC, batch 64,
2 threads): spinning 160-200 ms, sleeping 230-330 ms, one thread 240-250 ms on an idle machine;
with one core held by another program, spinning collapses to ~800 ms while sleeping stays at
~320 ms. So the ``captioning`` command lets the threads spin when the machine is idle as it
starts, and makes them sleep when other programs already keep a core busy (or when it cannot
tell). ``OMP_WAIT_POLICY`` set by the user always wins (``PASSIVE`` on a shared machine, or
with DataLoader workers competing for few cores).

Only the standard library here: this runs before the first ``import torch``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, MutableMapping

# Cores' worth of CPU time other programs may use while we still call the machine idle.
IDLE_BELOW_CORES = 0.5
# Set when the choice was to spin (there is no OMP_WAIT_POLICY value for the library default),
# so processes started by this one (DDP ranks) make the same choice.
DECIDED = "CAPTIONING_OMP_WAIT"


def cpu_times() -> tuple[int, int]:
    """(total, idle) CPU time in ticks over all cores since boot, from Linux's /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(fields), fields[3] + fields[4]


def busy_cores(
    interval: float = 0.2,
    read: Callable[[], tuple[int, int]] = cpu_times,
    cores: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> float | None:
    """Cores kept busy by other programs during ``interval`` seconds (this process sleeps
    meanwhile), or None where it cannot be measured (no /proc/stat)."""
    try:
        total0, idle0 = read()
        sleep(interval)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (cores or os.cpu_count() or 1)


def choose_wait_policy(
    environ: MutableMapping[str, str] = os.environ, measure: Callable[[], float | None] = busy_cores
) -> str:
    """Set ``OMP_WAIT_POLICY`` in ``environ`` unless the user did (module docstring); returns
    what OpenMP will do: "user: <value>", "spin" (library default) or "PASSIVE"."""
    if "OMP_WAIT_POLICY" in environ:
        return f"user: {environ['OMP_WAIT_POLICY']}"
    if environ.get(DECIDED) == "spin":  # a process we started (DDP): same choice, not measured again
        return "spin"
    busy = measure()
    if busy is not None and busy < IDLE_BELOW_CORES:
        environ[DECIDED] = "spin"
        return "spin"
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"


def process_cpu_ticks() -> int:
    """This process's CPU time (all threads) in /proc/stat ticks."""
    times = os.times()
    return round((times.user + times.system) * os.sysconf("SC_CLK_TCK"))


class ContentionWatch:
    """Notices, while training, that other programs started using the CPU the spinning OpenMP
    threads share (the wait policy cannot change once torch runs: a step then slows ~9x and
    stays there), and drops torch to one thread, which spins against nobody.

    :meth:`check` is called between training steps; every ``interval`` seconds it compares the
    CPU time all programs used with this process's own: ``patience`` windows in a row where
    others kept more than :data:`IDLE_BELOW_CORES` cores busy trigger the fall-back (once; a
    line on stderr says what happened and how to avoid it). Only the standard library here.
    """

    def __init__(
        self,
        interval: float = 10.0,
        patience: int = 2,
        read: Callable[[], tuple[int, int]] = cpu_times,
        own: Callable[[], int] = process_cpu_ticks,
        clock: Callable[[], float] = time.monotonic,
        set_threads: Callable[[int], None] | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.interval, self.patience = interval, patience
        self.read, self.own, self.clock = read, own, clock
        self.set_threads, self.say = set_threads, say
        self.busy_windows, self.done = 0, False
        self._last: tuple[float, int, int, int] | None = None

    def check(self) -> None:
        if self.done:
            return
        now = self.clock()
        try:
            total, idle = self.read()
            own = self.own()
        except (OSError, ValueError, IndexError):
            self.done = True  # nothing to measure here (no /proc/stat)
            return
        if self._last is None or now - self._last[0] < self.interval:
            if self._last is None:
                self._last = (now, total, idle, own)
            return
        _, total0, idle0, own0 = self._last
        self._last = (now, total, idle, own)
        if total <= total0:
            return
        cores = os.cpu_count() or 1
        busy_ticks = (total - total0) - (idle - idle0)
        others = max(0.0, (busy_ticks - (own - own0)) / (total - total0) * cores)
        self.busy_windows = self.busy_windows + 1 if others >= IDLE_BELOW_CORES else 0
        if self.busy_windows >= self.patience:
            self.done = True
            if self.set_threads is not None:
                self.set_threads(1)
            if self.say is not None:
                self.say(
                    f"other programs now keep {others:.1f} core(s) busy: training goes on with 1 thread, since "
                    "OpenMP threads chosen to spin-wait (the machine was idle at start) would slow each step "
                    "several times over. On a shared machine set OMP_WAIT_POLICY=PASSIVE before starting"
                )


def watch_needed(environ: MutableMapping[str, str] = os.environ) -> bool:
    """True when this process chose spinning threads (the case :class:`ContentionWatch` guards)."""
    return "OMP_WAIT_POLICY" not in environ and environ.get(DECIDED) == "spin"
