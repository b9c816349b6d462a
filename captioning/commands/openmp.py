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
