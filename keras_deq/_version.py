"""The version of keras_deq: the one place it is written.

`pyproject.toml` reads it (`[tool.setuptools.dynamic]`, without importing the package) and
`keras_deq.__version__` re-exports it.
"""

__version__ = "0.1.0"
