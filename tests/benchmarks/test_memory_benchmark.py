"""benchmarks/memory.py --check: the DEQ's training memory is flat in the iterations."""

import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "memory.py"


@pytest.mark.slow
def test_implicit_memory_flat_and_unrolled_growing():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--repeats", "1", "--steps", "1", "--check"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "check passed" in result.stdout


@pytest.mark.slow  # two runs of the benchmark: 40-80 s on 2 cores
def test_a_state_too_small_to_measure_is_reported_not_divided_by():
    # A 2x4 state allocates nothing the allocator shows (here: a peak of 0 MiB), and the
    # ratio used to raise ZeroDivisionError; `--check` must then fail, not pass.
    args = ["--batch", "2", "--width", "4", "--iters", "2", "3", "--repeats", "1", "--steps", "1"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if "not measurable" not in result.stdout:  # an allocator that showed something
        assert "peak ratio 3/2 iterations, fixed_point implicit:" in result.stdout
        return
    checked = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--check"], capture_output=True, text=True, timeout=600
    )
    assert checked.returncode != 0
    assert "peak too small to compare" in checked.stdout + checked.stderr


@pytest.mark.slow  # four processes of the benchmark: 2-4 minutes on 2 cores
def test_checkpointed_unrolled_memory_grows_less_than_unrolled():
    # `--check`: at 64 iterations the checkpointed peak is below plain unrolling's, and
    # its growth from 8 to 64 iterations is smaller.
    args = ["--iters", "8", "64", "--modes", "unrolled", "unrolled_checkpoint"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--repeats", "1", "--steps", "1", "--check"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "check passed" in result.stdout
