"""Ctrl-C and SIGTERM stop a real ``fedlora simulate`` at its next wait, leave no process, and can be resumed."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora.cli import main
from tests.conftest import TINY

pytestmark = pytest.mark.slow

RUN = [*TINY, "clients=2", "clients_per_round=2"]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Ray's raylet, GCS, workers...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return f"{pid} (gone)"


def start(out: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fedlora.cli", "simulate", *RUN, *overrides, f"output_dir={out}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_rows(proc: subprocess.Popen, out: Path, rows: int) -> None:
    deadline = time.monotonic() + 240
    while not ((out / "metrics.csv").is_file() and len((out / "metrics.csv").read_text().splitlines()) >= rows + 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.2)


def stops_cleanly(proc: subprocess.Popen, signum: int, code: int, below: list[int]) -> str:
    """Send ``signum``; the run exits with ``code`` and leaves no process. Returns its output."""
    proc.send_signal(signum)
    try:
        # a bound against a hang, not a speed test: a busy machine (a deployment test on the other
        # worker) has taken more than 10 s to shut Ray down
        assert proc.wait(timeout=90) == code
    finally:
        proc.kill()
    output = proc.stdout.read() if proc.stdout else ""
    assert "interrupted after round" in output and "server.resume=true" in output, output
    # Nothing left behind: Ray's workers exit once their raylet is gone, which takes a few seconds when
    # the machine is busy (the tests run on two workers), so wait for them within a bound.
    deadline = time.monotonic() + 30
    while (left := [pid for pid in below if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == [], [cmdline(pid) for pid in left]
    return output


def rounds_of(out: Path) -> list[int]:
    with (out / "metrics.csv").open() as f:
        return [int(r["round"]) for r in csv.DictReader(f)]


def test_sigterm_stops_the_run_cleanly_between_rounds_and_it_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start(out, "rounds=50")
    wait_for_rows(proc, out, 2)  # round 1 is done: Ray and its workers are up, round 2 is running
    below = descendants(proc.pid)
    assert below  # Ray's processes
    seen = len((out / "metrics.csv").read_text().splitlines()) - 2  # the last finished round
    stops_cleanly(proc, signal.SIGTERM, 143, below)
    rounds = rounds_of(out)
    assert rounds == list(range(rounds[-1] + 1))  # whole rows, no gap
    # it stopped at the server's next wait: at most the round running when the signal came (and one
    # more that finished between reading the file and sending) was written, not the other 40-odd
    assert rounds[-1] <= seen + 2, (seen, rounds[-1])
    # resumable: it continues after the last finished round
    assert main(["simulate", *RUN, f"rounds={rounds[-1] + 1}", "server.resume=true", f"output_dir={out}"]) == 0
    assert rounds_of(out) == list(range(rounds[-1] + 2))
    assert f"resuming after round {rounds[-1]}" in (out / "server.log").read_text()


def test_ctrl_c_stops_the_clients_in_the_middle_of_a_round(tmp_path: Path) -> None:
    """A round of 10^6 local steps (hours): the first Ctrl-C says at once what happens, the clients stop at
    their next micro-batch (they see the stop file), and the run ends with round 0 kept. Flower's reports of
    the stopped client rounds are not shown."""
    out = tmp_path / "run"
    proc = start(out, "rounds=2", "train.local_steps=1000000", "train.personal_eval=false")
    wait_for_rows(proc, out, 1)  # round 0's evaluation is written: round 1's clients are starting
    below = descendants(proc.pid)
    time.sleep(3)  # into their local steps
    output = stops_cleanly(proc, signal.SIGINT, 130, below)
    assert "the clients stop at their next step" in output and "Ctrl-C again to stop now" in output, output
    assert "ClientStopped" not in output and "ERROR" not in output, output
    assert rounds_of(out) == [0]
    assert "interrupted after round 0 of 2" in output
