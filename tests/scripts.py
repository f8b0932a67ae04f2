"""The repository's scripts (examples/, benchmarks/, docs/figures/) loaded as modules in tests."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(relative_path, name=None):
    """The script at `relative_path` (from the repository root) run as a module named `name`
    (default: the file's stem). Its directory goes on `sys.path` first, so that the imports
    of its sibling scripts resolve as when it runs from there."""
    path = ROOT / relative_path
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
