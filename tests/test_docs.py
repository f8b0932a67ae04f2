"""The documentation: the site builds with `mkdocs build --strict`, and every tutorial runs.

The ```python blocks of `docs/index.md` and `docs/tutorials/*.md` run in order, sharing one
namespace, in one fresh Python process per page (so a page can configure TensorFlow devices
before TensorFlow starts, as the distributed tutorial does). Pages run in parallel, one process
per core. A block preceded by the line `<!-- skip-test -->` is not run; the page says why.
"""

import concurrent.futures
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [DOCS / "index.md", *sorted((DOCS / "tutorials").glob("*.md"))]
SKIP_MARK = "<!-- skip-test -->"


def _env():
    env = dict(os.environ)
    env.update(
        NO_MKDOCS_2_WARNING="1",
        KERAS_BACKEND="tensorflow",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONWARNINGS="ignore::DeprecationWarning",
    )
    return env


def python_blocks(text):
    """The ```python blocks of a Markdown page: a list of (first line number, code, skipped)."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            previous = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
            start, body = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise ValueError(f"unclosed ```python block at line {start}")
            code = textwrap.dedent("\n".join(body)) + "\n"
            blocks.append((start + 1, code, previous == SKIP_MARK))
        i += 1
    return blocks


def page_script(page):
    """One script running a page's blocks in order in one namespace.

    Each block is padded with blank lines so that a traceback names the page and its line.
    """
    name = str(page.relative_to(ROOT))
    parts = []
    for line, code, skipped in python_blocks(page.read_text()):
        if not skipped:
            padded = "\n" * (line - 1) + code
            parts.append(f"exec(compile({padded!r}, {name!r}, 'exec'), globals())\n")
    return "".join(parts)


def test_python_blocks_parser():
    text = "a\n```python\nx = 1\n```\n\n<!-- skip-test -->\n\n```python\ny = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n", False), (9, "y = 2\n", True)]


def test_mkdocs_build_strict(tmp_path):
    benchmarks = DOCS / "benchmarks.md"
    if not benchmarks.exists():
        pytest.fail("docs/benchmarks.md is missing: the nav links to it")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "api" / "layers" / "index.html").exists()


def _run_page(page, workdir):
    """Runs a page's code in a fresh Python process; returns a failure message or None."""
    workdir.mkdir()
    path = workdir / "page.py"
    path.write_text(page_script(page))
    # Run in workdir so that files the tutorials write (saved models) land there.
    proc = subprocess.run(
        [sys.executable, str(path)],
        cwd=workdir,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        return f"{page.relative_to(ROOT)} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    return None


def test_every_page_has_runnable_code():
    for page in PAGES:
        blocks = [b for b in python_blocks(page.read_text()) if not b[2]]
        assert blocks, f"{page.relative_to(ROOT)} has no runnable ```python block"


def test_page_code_runs(tmp_path):
    """Every page's code, pages in parallel (one process each), the slowest pages first."""
    pages = sorted(PAGES, key=lambda p: -p.read_text().count(".fit("))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(len(pages), max(2, cores or 2))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(_run_page, page, tmp_path / f"{i}-{page.stem}")
            for i, page in enumerate(pages)
        ]
        failures = [f.result() for f in futures]
    failures = [f for f in failures if f]
    assert not failures, "\n\n".join(failures)
