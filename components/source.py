"""Parsing the project's own Python source, from any number of threads."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

# CPython 3.11 keeps the counter it checks while building an AST per interpreter, not per thread: two
# threads that parse at once can fail with "SystemError: AST constructor recursion depth mismatch"
# (python/cpython#106905). Prefect runs a flow's tasks in threads, and each fingerprints code.
_PARSE_LOCK = threading.Lock()


def parse_file(path: Path) -> ast.Module:
    """The syntax tree of the Python file at `path`."""
    source = path.read_bytes()
    with _PARSE_LOCK:
        return ast.parse(source, filename=str(path))
