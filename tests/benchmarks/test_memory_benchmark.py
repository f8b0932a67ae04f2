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
