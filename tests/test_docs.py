"""The documentation: the site builds with `mkdocs build --strict`, every page's code runs and
prints what the page shows, and every public name has an entry in the API reference.

The ```python blocks of `README.md`, `docs/index.md` and `docs/tutorials/*.md` run in order,
sharing one namespace, in one fresh Python process per page (so a page can configure TensorFlow
devices before TensorFlow starts, as the distributed tutorial does). Pages run in parallel, one
process per core. A block preceded by the line `<!-- skip-test -->` is not run; the page says why.

An output block, a fence opened by ```` ```text title="Output" ````, shows what the ```python
block before it prints (prose may stand between them): the test compares the two, see
`output_mismatch` for the rule.
"""

import ast
import concurrent.futures
import functools
import html
import importlib
import inspect
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", DOCS / "index.md", *sorted((DOCS / "tutorials").glob("*.md"))]
SKIP_MARK = "<!-- skip-test -->"
OUTPUT_FENCE = '```text title="Output"'
BLOCK_MARK = "\x1e{}\x1e"


def _env():
    env = dict(os.environ)
    env.update(
        NO_MKDOCS_2_WARNING="1",
        KERAS_BACKEND="tensorflow",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONWARNINGS="ignore::DeprecationWarning",
    )
    return env


def fences(text):
    """The fenced blocks of a Markdown page: (first body line number, opening line, body, the
    last non-blank line before the fence)."""
    found = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = lines[i].strip()
        if opening.startswith("```"):
            previous = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
            start, body = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise ValueError(f"unclosed {opening} block at line {start}")
            found.append((start + 1, opening, textwrap.dedent("\n".join(body)) + "\n", previous))
        i += 1
    return found


def python_blocks(text):
    """The ```python blocks of a Markdown page: a list of (first line number, code, skipped)."""
    return [
        (line, code, previous == SKIP_MARK)
        for line, opening, code, previous in fences(text)
        if opening == "```python"
    ]


def output_blocks(text):
    """The output blocks of a page: (first line number, index in `python_blocks` of the block
    whose output it shows, text)."""
    shown, index = [], -1
    for line, opening, body, _ in fences(text):
        if opening == "```python":
            index += 1
        elif opening == OUTPUT_FENCE:
            if index < 0:
                raise ValueError(f"output block at line {line} follows no ```python block")
            shown.append((line, index, body))
    return shown


def page_script(page):
    """One script running a page's blocks in order in one namespace.

    Each block is padded with blank lines so that a traceback names the page and its line, and
    preceded by a line `BLOCK_MARK` with its index, which splits the printed output by block.
    """
    name = str(page.relative_to(ROOT))
    parts = []
    for index, (line, code, skipped) in enumerate(python_blocks(page.read_text())):
        if not skipped:
            mark = "\n" + BLOCK_MARK.format(index) + "\n"
            parts.append(f"__import__('sys').stdout.write({mark!r})\n")
            padded = "\n" * (line - 1) + code
            parts.append(f"exec(compile({padded!r}, {name!r}, 'exec'), globals())\n")
    parts.append("__import__('sys').stdout.flush()\n")
    return "".join(parts)


def printed_by_block(stdout):
    """`{block index: what it printed}` from the output of `page_script`."""
    pieces = re.split("\n" + BLOCK_MARK.format(r"(\d+)") + "\n", stdout)
    return {int(index): printed for index, printed in zip(pieces[1::2], pieces[2::2], strict=True)}


_DURATION = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:s|ms|us|µs)(?:/step)?(?!\w)")
_TOKEN = re.compile(r"\.\.\.|<duration>|(?<![\w.])\d+(?:\.\d+)?(?:e[-+]?\d+)?(?!\w)|\w+|\S")
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _tokens(text):
    return _TOKEN.findall(_DURATION.sub("<duration>", text))


def numbers_match(shown, printed):
    """Whether a printed number matches the one a page shows.

    An integer (`43`, shapes, steps, counts) must be equal. Any other number (`0.934`,
    `1.2e-05`: accuracies, mean steps, residuals) must agree to two significant digits: the
    same order of magnitude, and within one unit of the shown value's second significant
    digit. A shown zero only matches zero: exactly in scientific notation (`0.0000e+00`),
    to the shown decimals otherwise (`0.00`).
    """
    if not re.search("[.e]", shown):
        return shown == printed
    s, p = float(shown), float(printed)
    if s == 0:
        if "e" in shown:
            return p == 0
        return abs(p) <= 0.5 * 10.0 ** -len(shown.split(".")[1])
    return abs(p - s) <= 10.0 ** (math.floor(math.log10(abs(s))) - 1) * (1 + 1e-9)


def _token_match(shown, printed):
    if _NUMBER.fullmatch(shown) and _NUMBER.fullmatch(printed):
        return numbers_match(shown, printed)
    return shown == printed


def output_mismatch(shown, printed):
    """None if `printed` (what a block printed) matches `shown` (its output block), else why not.

    Both are split into tokens (numbers, words, single other characters): white space, and so
    line wrapping, does not count. Numbers compare as `numbers_match` says, durations
    (`1s`, `31ms/step`) match any duration, `...` in the shown text matches any run of printed
    tokens, and every other token must be equal.
    """
    want, got = _tokens(shown), _tokens(printed)

    @functools.cache
    def match(i, j):  # want[i:] matches got[j:]
        if i == len(want):
            return j == len(got)
        if want[i] == "...":
            return any(match(i + 1, k) for k in range(j, len(got) + 1))
        return j < len(got) and _token_match(want[i], got[j]) and match(i + 1, j + 1)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 4 * (len(want) + len(got)) + 100))
    if match(0, 0):
        return None
    return f"shows:\n{textwrap.indent(shown, '    ')}printed:\n{textwrap.indent(printed, '    ')}"


def test_python_blocks_parser():
    text = "a\n```python\nx = 1\n```\n\n<!-- skip-test -->\n\n```python\ny = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n", False), (9, "y = 2\n", True)]
    text += f"b\n{OUTPUT_FENCE}\n2\n```\n"
    assert output_blocks(text) == [(16, 1, "2\n")]


def test_output_mismatch():
    assert output_mismatch("steps= 43 converged=1.00\n", "steps= 43 converged=0.995\n") is None
    assert output_mismatch("(1437, 64)\n", "(1437,\n 64)") is None
    assert output_mismatch("(1437, 64)\n", "(1436, 64)\n")
    assert output_mismatch("residual 1.2e-05\n", "residual 1.1e-05\n") is None
    assert output_mismatch("residual 1.0534e-05\n", "residual 5.7872e-05\n")
    assert output_mismatch("jac_loss: 0.0000e+00\n", "jac_loss: 0.0000e+00\n") is None
    assert output_mismatch("jac_loss: 0.0000e+00\n", "jac_loss: 1.0000e-06\n")
    assert output_mismatch("accuracy 0.933\n", "accuracy 0.941\n") is None
    assert output_mismatch("accuracy 0.933\n", "accuracy 0.95\n")
    assert output_mismatch("converged False\n", "converged True\n")
    assert (
        output_mismatch(
            "23/23 - 1s - 31ms/step - loss: 0.33\n", "23/23 - 2s - 9ms/step - loss: 0.3291\n"
        )
        is None
    )
    assert output_mismatch("Epoch 1/3\n...\nloss: 0.33\n", "Epoch 1/3\nx\ny\nloss: 0.33\n") is None
    assert output_mismatch("Epoch 1/3\n...\nloss: 0.33\n", "Epoch 1/3\nx\ny\nloss: 0.33\nz\n")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site, built once by `mkdocs build --strict`; the build's output is the failure message."""
    site_dir = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return site_dir, proc


def test_mkdocs_build_strict(site):
    benchmarks = DOCS / "benchmarks.md"
    if not benchmarks.exists():
        pytest.fail("docs/benchmarks.md is missing: the nav links to it")
    site_dir, proc = site
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site_dir / "index.html").exists()
    assert (site_dir / "api" / "layers" / "index.html").exists()


def _run_page(page, workdir):
    """Runs a page's code in a fresh Python process; returns the finished process."""
    workdir.mkdir()
    path = workdir / "page.py"
    path.write_text(page_script(page))
    # Run in workdir so that files the tutorials write (saved models) land there.
    return subprocess.run(
        [sys.executable, str(path)],
        cwd=workdir,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def run_pages(tmp_path):
    """`{page: finished process}`: every page's code, pages in parallel (one process each), the
    slowest pages first."""
    pages = sorted(PAGES, key=lambda p: -p.read_text().count(".fit("))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(len(pages), max(2, cores or 2))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            page: pool.submit(_run_page, page, tmp_path / f"{i}-{page.stem}")
            for i, page in enumerate(pages)
        }
        return {page: future.result() for page, future in futures.items()}


def test_every_page_has_runnable_code():
    for page in PAGES:
        blocks = [b for b in python_blocks(page.read_text()) if not b[2]]
        assert blocks, f"{page.relative_to(ROOT)} has no runnable ```python block"


def test_page_code_runs(tmp_path):
    """Every page's code runs, and each output block shows what its ```python block prints.

    One test, so that the pages run once even when pytest-xdist spreads this module's tests
    over several workers.
    """
    failures = []
    for page, proc in run_pages(tmp_path).items():
        name = page.relative_to(ROOT)
        if proc.returncode != 0:
            failures.append(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
            continue
        printed = printed_by_block(proc.stdout)
        for line, index, shown in output_blocks(page.read_text()):
            why = output_mismatch(shown, printed.get(index, ""))
            if why:
                failures.append(f"{name}:{line}: the output block {why}")
    assert not failures, "\n\n".join(failures)


# ---------------------------------------------------------------- the built site's HTML


def _html_pages(site_dir, under=""):
    return {path: path.read_text() for path in sorted((site_dir / under).rglob("*.html"))}


_ANCHOR = re.compile(r'\sid="(keras_deq(?:\.\w+)*)"')


def _resolve(path):
    """The object a dotted path names (the longest importable module, then attributes), or None."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attribute in parts[i:]:
            obj = getattr(obj, attribute, None)
        return obj
    return None


def _defines_all(path):
    tree = ast.parse(path.read_text())
    return any(
        isinstance(node, ast.Assign)
        and any(getattr(t, "id", None) == "__all__" for t in node.targets)
        for node in tree.body
    )


def public_modules():
    """The package, the modules in its `__all__`, and every module of it that declares `__all__`."""
    import keras_deq

    names = {"keras_deq"}
    names |= {
        f"keras_deq.{name}"
        for name in keras_deq.__all__
        if inspect.ismodule(getattr(keras_deq, name))
    }
    package = pathlib.Path(keras_deq.__file__).parent
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not any(part.startswith("_") for part in parts) and _defines_all(path):
            names.add(".".join(parts))
    return [importlib.import_module(name) for name in sorted(names)]


def public_names(module):
    """`__all__`, or else the names without a leading underscore that the module's own source
    defines (functions, classes, assignments); submodules left out."""
    if hasattr(module, "__all__"):
        names = list(module.__all__)
    else:
        names = []
        for node in ast.parse(inspect.getsource(module)).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                names.append(node.name)
            elif isinstance(node, ast.Assign):
                names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        names = [name for name in names if not name.startswith("_")]
    return [name for name in names if not inspect.ismodule(getattr(module, name))]


def own_members(cls):
    """A class's public methods and properties that it defines and that override no base's."""
    kinds = (property, staticmethod, classmethod, type(lambda: None))
    return [
        name
        for name, value in vars(cls).items()
        if not name.startswith("_")
        and isinstance(value, kinds)
        and not any(hasattr(base, name) for base in cls.__mro__[1:])
    ]


def test_every_public_name_has_an_api_entry(site):
    """Every public name of every public module, and every public method and property of its
    classes, has an entry (a heading with an anchor) in the built API reference.

    An entry is a heading whose anchor names the same object (`keras_deq.DEQ` covers
    `keras_deq.layers.DEQ`); a former name of an object (`linalg.conv_operator_norm`, now
    `conv_operator_norm_lower`) counts when the API reference mentions it in a code span.
    """
    site_dir, proc = site
    assert proc.returncode == 0, proc.stdout + proc.stderr
    api = _html_pages(site_dir, "api")
    anchors = {anchor for text in api.values() for anchor in _ANCHOR.findall(text)}
    mentioned = {
        html.unescape(code)
        for text in api.values()
        for code in re.findall(r"<code>([^<]+)</code>", text)
    }
    documented = {}  # id(object) -> the anchors that name it
    for anchor in anchors:
        obj = _resolve(anchor)
        if obj is not None:
            documented.setdefault(id(obj), []).append(anchor)
    missing = []
    for module in public_modules():
        for name in public_names(module):
            obj = getattr(module, name)
            entries = documented.get(id(obj), [])
            if not any(entry.rsplit(".", 1)[-1] == name for entry in entries) and not (
                entries and name in mentioned
            ):
                missing.append(f"{module.__name__}.{name}")
            if inspect.isclass(obj) and entries:
                missing += [
                    f"{module.__name__}.{name}.{member}"
                    for member in own_members(obj)
                    if not any(f"{entry}.{member}" in anchors for entry in entries)
                ]
    assert not missing, "no API entry for:\n" + "\n".join(sorted(set(missing)))


def test_api_reference_renders_cleanly(site):
    """No Returns item with an empty name before its dash, no doctest rendered as nested quotes."""
    site_dir, proc = site
    assert proc.returncode == 0, proc.stdout + proc.stderr
    problems = []
    for path, text in _html_pages(site_dir, "api").items():
        page = path.relative_to(site_dir)
        if re.search(r'class="doc-section-item field-body">\s*–', text):
            problems.append(f"{page}: a Returns item renders as '– description' (no name)")
        if re.search(r"<blockquote>\s*<blockquote>", text):
            problems.append(f"{page}: a doctest renders as nested quotes (`Example:` + `>>>`?)")
    assert not problems, "\n".join(problems)


def test_site_needs_no_network(site):
    """Scripts, stylesheets and fonts come from the site itself (no CDN), math included."""
    site_dir, proc = site
    assert proc.returncode == 0, proc.stdout + proc.stderr
    remote = re.compile(
        r'<(?:script|img)\b[^>]*\ssrc="(?:https?:)?//|<link\b(?=[^>]*\srel="(?:stylesheet|preload|preconnect)")[^>]*\shref="(?:https?:)?//'
    )
    pages = _html_pages(site_dir)
    offenders = [
        str(path.relative_to(site_dir)) for path, text in pages.items() if remote.search(text)
    ]
    assert not offenders, f"pages loading remote assets: {offenders}"
    index = pages[site_dir / "index.html"]
    for asset in re.findall(r'(?:src|href)="([^"]*vendor/katex[^"]*)"', index):
        assert (site_dir / asset.split("?")[0]).is_file(), asset
    assert "katex.min.js" in index and "katex.min.css" in index


@pytest.mark.skipif(shutil.which("node") is None, reason="node runs the vendored KaTeX")
def test_math_renders_with_katex(site):
    """Every formula of the site (the `arithmatex` spans and divs) parses with the vendored
    KaTeX, which the browser runs (`throwOnError` would otherwise show it in red)."""
    site_dir, proc = site
    assert proc.returncode == 0, proc.stdout + proc.stderr
    formulas = []
    for path, text in _html_pages(site_dir).items():
        for _tag, body in re.findall(r'<(span|div) class="arithmatex">(.*?)</\1>', text, re.S):
            formulas.append((str(path.relative_to(site_dir)), html.unescape(body).strip()))
    assert formulas, "no math on the site"
    script = (
        "const katex = require(process.argv[1]);"
        "const formulas = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
        "for (const [page, tex] of formulas) {"
        "  const display = tex.startsWith('\\\\[');"
        "  try { katex.renderToString(tex.slice(2, -2), {displayMode: display, throwOnError: true}); }"
        "  catch (e) { console.log(page + ': ' + tex + '\\n  ' + e.message); }"
        "}"
    )
    katex = DOCS / "javascripts" / "vendor" / "katex" / "katex.min.js"

    proc = subprocess.run(
        ["node", "-e", script, str(katex)],
        input=json.dumps(formulas),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and not proc.stdout, proc.stdout + proc.stderr
