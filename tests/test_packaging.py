"""Packaging: the project builds into an sdist and a wheel that `twine check` accepts, and a
fresh virtual environment with the wheel (not the checkout) installed runs the digits demo.

The fresh environment borrows the running environment's third-party packages (TensorFlow,
Keras, scikit-learn) through a `.pth` file rather than downloading them again. Its own
site-packages comes first on `sys.path` and the running environment's `.pth` files are not
read (an editable install of the checkout stays out), so `keras_deq` is imported from the
wheel; the test checks where it comes from. The wheel is installed with `--no-deps`: the
dependency metadata itself is checked by reading it.

Building uses `python -m build`, whose isolated build environment installs setuptools from the
package registry, as `pip install -e .` does.
"""

import ast
import email.parser
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parents[1]
VERSION_FILE = ROOT / "keras_deq" / "_version.py"
FIVE_PAPERS = (
    "Stabilizing Equilibrium Models by Jacobian Regularization",
    "Positive concave deep equilibrium models",
    "Optimization Induced Equilibrium Networks",
    "Lipschitz Multiscale Deep Equilibrium Models",
    "Separation and Bias of Deep Equilibrium Models",
)


def version_in_source():
    """`__version__` as written in keras_deq/_version.py (read, not imported)."""
    for node in ast.parse(VERSION_FILE.read_text()).body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "__version__":
            return ast.literal_eval(node.value)
    raise AssertionError("no __version__ in keras_deq/_version.py")


def pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def run(command, cwd=ROOT, env=None, timeout=600):
    """Run a command; fail the test with its output if it fails."""
    proc = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{command} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def clean_env():
    """The environment for the subprocesses: nothing that puts the checkout on `sys.path`."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH"):
        env.pop(name, None)
    env.update(KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2", PYTHONNOUSERSITE="1")
    return env


def wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        return names, email.parser.Parser().parsestr(zf.read(info).decode())


def make_venv(path):
    """A new virtual environment that sees the running environment's site-packages after its
    own, without reading their `.pth` files. Returns its Python."""
    run([sys.executable, "-m", "venv", "--without-pip", path])
    python = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    own = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    own = pathlib.Path(own.stdout.strip())
    borrowed = [
        p
        for p in sys.path
        if pathlib.Path(p).name in ("site-packages", "dist-packages") and pathlib.Path(p).is_dir()
    ]
    (own / "_borrowed_site_packages.pth").write_text("\n".join(borrowed) + "\n")
    return python


def test_version_is_written_once():
    """keras_deq/_version.py holds the version; pyproject.toml and the package read it."""
    import keras_deq

    project = pyproject()
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "keras_deq._version.__version__"
    assert keras_deq.__version__ == version_in_source()
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?(?:\.dev\d+)?", version_in_source())
    assert not re.search(r"^version:", (ROOT / "CITATION.cff").read_text(), re.M)


def test_classifiers_are_known_to_pypi():
    """PyPI refuses an upload with an unknown classifier (`twine check` does not look)."""
    trove = pytest.importorskip("trove_classifiers")
    classifiers = pyproject()["project"]["classifiers"]
    assert not [c for c in classifiers if c not in trove.classifiers]
    assert not [c for c in classifiers if c in trove.deprecated_classifiers]


def test_citation_file():
    """CITATION.cff: the keys CFF 1.2.0 requires, and a reference for each of the five papers."""
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    assert cff["message"] and cff["title"] and cff["authors"]
    assert cff["license"] == pyproject()["project"]["license"]
    titles = [ref["title"] for ref in cff["references"]]
    for paper in FIVE_PAPERS:
        assert any(title.startswith(paper) for title in titles), paper
    for ref in cff["references"]:
        assert ref["type"] and ref["authors"] and isinstance(ref["year"], int), ref["title"]


def test_wheel_builds_checks_and_runs_the_demo_in_a_fresh_venv(tmp_path):
    """`python -m build` (the sdist, then the wheel built from the sdist), `twine check
    --strict`, then the wheel in a fresh venv runs examples/digits.py from a directory outside
    the checkout."""
    start = time.perf_counter()
    version = version_in_source()
    dist = tmp_path / "dist"
    env = clean_env()
    run([sys.executable, "-m", "build", "--outdir", dist, ROOT], env=env)
    wheel = dist / f"keras_deq-{version}-py3-none-any.whl"
    sdist = dist / f"keras_deq-{version}.tar.gz"
    assert sorted(p.name for p in dist.iterdir()) == sorted([sdist.name, wheel.name])
    run([sys.executable, "-m", "twine", "check", "--strict", wheel, sdist], env=env)

    # The wheel: the package and its metadata, nothing else; the version, license and
    # dependencies that pyproject.toml declares.
    names, meta = wheel_metadata(wheel)
    tops = {name.split("/")[0] for name in names}
    assert tops == {"keras_deq", f"keras_deq-{version}.dist-info"}
    assert f"keras_deq-{version}.dist-info/licenses/LICENSE" in names
    assert meta["Version"] == version
    assert meta["License-Expression"] == "Apache-2.0"
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("tensorflow<") or r.startswith("tensorflow>") for r in requires)
    assert not any(r.startswith("tensorflow-cpu") for r in requires)
    assert any(r.startswith("tensorflow[and-cuda]") and 'extra == "gpu"' in r for r in requires)
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert {"Documentation", "Source", "Changelog"} <= set(urls)

    # The sdist: what the wheel is built from, plus the license and citation files.
    with tarfile.open(sdist) as tf:
        members = {m.split("/", 1)[1] for m in tf.getnames() if "/" in m}
    assert {"LICENSE", "README.md", "CITATION.cff", "pyproject.toml"} <= members
    assert "keras_deq/_version.py" in members
    built = time.perf_counter()

    # A fresh venv with the wheel installed; keras_deq must come from it.
    venv = tmp_path / "venv"
    python = make_venv(venv)
    run([python, "-m", "pip", "install", "--no-deps", "--ignore-installed", wheel], env=env)
    where = run(
        [
            python,
            "-c",
            "import importlib.metadata as m, importlib.util as u;"
            "print(u.find_spec('keras_deq').origin); print(m.version('keras-deq'))",
        ],
        cwd=tmp_path,
        env=env,
    ).stdout.split()
    assert pathlib.Path(where[0]).is_relative_to(venv), where
    assert where[1] == version

    # The README's demo, from a directory outside the checkout (examples/ is not in the wheel).
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "examples" / "digits.py", work)
    demo = run(
        [
            python,
            "-c",
            "import runpy, sys, keras_deq; print('keras_deq', keras_deq.__version__, "
            "keras_deq.__file__); sys.argv = ['digits.py', *sys.argv[1:]]; "
            "runpy.run_path('digits.py', run_name='__main__')",
            "--epochs",
            "1",
            "--width",
            "32",
        ],
        cwd=work,
        env=env,
    ).stdout
    imported = re.search(r"^keras_deq (\S+) (\S+)$", demo, re.M)
    assert imported and imported[1] == version
    assert pathlib.Path(imported[2]).is_relative_to(venv), imported[2]
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", demo)[1])
    assert accuracy > 0.3, demo
    print(
        f"build + twine check: {built - start:.1f} s, "
        f"venv + install + demo: {time.perf_counter() - built:.1f} s"
    )
