"""Standard output of third-party code into a step's log, and the pacing of progress lines."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gcmlm_assets.step_output import LineWriter, ProgressPacer, stdout_to_log


def test_line_writer_hands_over_whole_lines_and_drops_blank_ones():
    lines = []
    writer = LineWriter(lines.append)
    writer.write("first half, ")
    assert lines == []
    writer.write("second half\n\n  \nbar 10%\rbar 20%\r")
    writer.write("tail without newline")
    writer.flush()
    assert lines == ["first half, second half", "bar 10%", "bar 20%", "tail without newline"]


def test_a_log_that_prints_does_not_recurse(capfd):
    lines = []

    def log(line: str) -> None:
        lines.append(line)
        print(f"echo: {line}")  # a handler writing to the redirected stdout

    with stdout_to_log(log):
        print("hello")
    assert lines == ["hello"]
    assert "echo: hello" in capfd.readouterr().err


def test_prints_descriptor_writes_and_spawned_processes_reach_the_log(capfd):
    lines, tqdm_setting = [], os.environ.get("TQDM_DISABLE")
    with stdout_to_log(lines.append):
        print("from print")
        sys.stdout.write("from sys.stdout\n")
        os.write(1, b"from descriptor 1\n")
        subprocess.run([sys.executable, "-c", "import os; print('from a child', os.environ.get('TQDM_DISABLE'))"],
                       check=True)
    out, _ = capfd.readouterr()
    assert out == ""
    # Python-level lines as they come; descriptor-level ones (native code, children) when the block ends.
    assert lines == ["from print", "from sys.stdout", "from descriptor 1", "from a child 1"]
    assert os.environ.get("TQDM_DISABLE") == tqdm_setting


def test_stdout_is_restored_after_an_error(capfd):
    lines = []
    before = sys.stdout
    with pytest.raises(RuntimeError, match="boom"):
        with stdout_to_log(lines.append):
            print("partial line before the error", end="")
            raise RuntimeError("boom")
    assert sys.stdout is before and lines == ["partial line before the error"]
    print("after the block")
    os.write(1, b"descriptor after the block\n")
    assert capfd.readouterr().out == "after the block\ndescriptor after the block\n"


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_is_paced_by_tenths_by_time_and_always_ends():
    clock = FakeClock()
    pacer = ProgressPacer(1000, fraction=0.1, seconds=30.0, clock=clock)
    due = []
    for done in [*range(16, 1000, 16), 1000]:  # batches of 16 patches, one second each; a short last one
        clock.now += 1.0
        if pacer.due(done):
            due.append(done)
    # One line per tenth (the first batch past each 100) and one at the end.
    assert due == [112, 208, 304, 400, 512, 608, 704, 800, 912, 1000]
    assert pacer.due(1000) is False  # the end is reported once

    slow = ProgressPacer(1000, fraction=0.5, seconds=30.0, clock=clock)
    due = []
    for done in range(10, 1001, 10):  # ten seconds per batch: time, not count, paces it
        clock.now += 10.0
        if slow.due(done):
            due.append(done)
    assert due[:3] == [30, 60, 90] and due[-1] == 1000
    assert slow.elapsed() == pytest.approx(1000.0)
