"""The code is ruff-clean (lint and format), as CI requires, and every download is pinned."""

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def ruff(*args):
    executable = shutil.which("ruff")
    command = [executable] if executable else [sys.executable, "-m", "ruff"]
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("args", [("check", "."), ("format", "--check", ".")])
def test_ruff(args):
    result = ruff(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_get_file_call_pins_a_file_hash():
    """`keras.utils.get_file` without `file_hash` uses a truncated or tampered file as is."""
    unpinned = []
    for folder in ("keras_deq", "examples", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text("utf-8"))):
                if (
                    isinstance(node, ast.Call)
                    and getattr(node.func, "attr", getattr(node.func, "id", None)) == "get_file"
                    and "file_hash" not in {k.arg for k in node.keywords}
                ):
                    unpinned.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not unpinned, unpinned
