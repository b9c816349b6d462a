"""The captioning command's choice of OpenMP waiting: spin on an idle machine, sleep on a busy
one or when it cannot tell, and never override the user's OMP_WAIT_POLICY."""

import os
import subprocess
import sys

import pytest

from captioning.commands.openmp import DECIDED, busy_cores, choose_wait_policy, cpu_times


def _reader(*samples):
    it = iter(samples)
    return lambda: next(it)


def test_busy_cores_from_two_cpu_time_samples():
    # 4 cores, 400 ticks in the window: 300 idle -> 1 core busy
    assert busy_cores(read=_reader((1000, 600), (1400, 900)), cores=4, sleep=lambda s: None) == pytest.approx(1.0)
    assert busy_cores(read=_reader((1000, 600), (1400, 1000)), cores=4, sleep=lambda s: None) == 0.0
    assert busy_cores(read=_reader((1000, 600), (1000, 600)), cores=4, sleep=lambda s: None) is None  # no ticks


def test_busy_cores_is_none_without_proc_stat():
    def missing():
        raise FileNotFoundError("/proc/stat")

    assert busy_cores(read=missing, sleep=lambda s: None) is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux only: /proc/stat")
def test_cpu_times_reads_this_machine():
    total, idle = cpu_times()
    assert total > 0 and 0 <= idle <= total


@pytest.mark.parametrize(
    ("busy", "expected", "env_after"),
    [
        (0.1, "spin", {DECIDED: "spin"}),  # idle: the library default (spin, then sleep)
        (1.0, "PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}),  # a core held by another program
        (None, "PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}),  # cannot tell: the safe choice
    ],
)
def test_choice_follows_the_load(busy, expected, env_after):
    env = {}
    assert choose_wait_policy(env, measure=lambda: busy) == expected
    assert env == env_after


def test_the_users_setting_wins_and_child_processes_inherit_the_choice():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert choose_wait_policy(env, measure=lambda: pytest.fail("measured")) == "user: ACTIVE"
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}
    child = {DECIDED: "spin"}  # what a spinning parent leaves for its DDP ranks
    assert choose_wait_policy(child, measure=lambda: pytest.fail("measured")) == "spin"
    assert "OMP_WAIT_POLICY" not in child


CHILD = """
import os, sys
os.environ.pop("OMP_WAIT_POLICY", None)
os.environ.pop("CAPTIONING_OMP_WAIT", None)
from captioning.commands import main as cli
choose, seen = cli.choose_wait_policy, []
cli.choose_wait_policy = lambda: seen.append("torch" in sys.modules) or choose(measure=lambda: 5.0)
try:
    cli.main(["fit", "--help"])
except SystemExit:
    pass
print("DECIDED", seen, os.environ.get("OMP_WAIT_POLICY"), "torch" in sys.modules)
"""


@pytest.mark.e2e
def test_the_command_decides_before_torch_is_imported():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    # decided once, torch not yet loaded; a busy machine (5 cores busy) -> PASSIVE; then fit imported torch
    assert "DECIDED [False] PASSIVE True" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


class _FakeMachine:
    """/proc/stat-like counters: ``cores`` cores, this process using ``own`` cores, others ``others``."""

    def __init__(self, cores: int) -> None:
        self.cores, self.t, self.total, self.idle, self.mine = cores, 0.0, 0, 0, 0
        self.own, self.others = 1.0, 0.0

    def advance(self, seconds: float) -> None:
        ticks = round(seconds * 100)
        self.t += seconds
        self.total += ticks * self.cores
        busy = round(ticks * min(self.cores, self.own + self.others))
        self.idle += ticks * self.cores - busy
        self.mine += round(ticks * self.own)


def _watch(machine, threads, lines):
    from captioning.commands.openmp import ContentionWatch

    return ContentionWatch(
        interval=10,
        read=lambda: (machine.total, machine.idle),
        own=lambda: machine.mine,
        clock=lambda: machine.t,
        set_threads=threads.append,
        say=lines.append,
    )


def test_training_drops_to_one_thread_when_another_program_starts_competing(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    machine, threads, lines = _FakeMachine(cores=2), [], []
    watch = _watch(machine, threads, lines)
    machine.own = 2.0  # our two spinning threads on an idle machine
    for _ in range(10):  # 50 s of steps, nobody else
        machine.advance(5)
        watch.check()
    assert threads == [] and lines == []
    machine.own, machine.others = 1.0, 1.0  # another program starts: a core each
    for _ in range(10):
        machine.advance(5)
        watch.check()
    assert threads == [1] and len(lines) == 1 and "OMP_WAIT_POLICY=PASSIVE" in lines[0]


def test_a_short_burst_of_other_work_does_not_change_the_threads(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    machine, threads, lines = _FakeMachine(cores=2), [], []
    watch = _watch(machine, threads, lines)
    for others in (0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0):  # two 5 s bursts of other work, far apart
        machine.others = others
        machine.advance(5)
        watch.check()
    assert threads == [] and lines == []


def test_the_watch_runs_only_when_this_process_chose_to_spin():
    from captioning.commands.openmp import watch_needed

    assert watch_needed({DECIDED: "spin"})
    assert not watch_needed({"OMP_WAIT_POLICY": "PASSIVE"})
    assert not watch_needed({DECIDED: "spin", "OMP_WAIT_POLICY": "ACTIVE"})  # the user's choice stands
    assert not watch_needed({})
