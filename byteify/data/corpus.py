"""The embedded default corpus: real English text that every CPython installation carries, so
demos and tests never download data.  Two parts, both in a stable order:

* the language reference topics in the standard library's ``pydoc_data`` (~0.47 MB), and
* the docstrings of the standard library's own Python sources (~1.6 MB on CPython 3.11), read
  with :mod:`ast` (nothing is imported), one document per module.

Also the fixed probe text used for bytes-per-token measurements.
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig

PROBE_TOPICS = ("if", "for", "while", "try", "with")

# Standard-library folders whose files are tests, data tables, bundled wheels or duplicates of
# the pydoc topics rather than documented library code.
_SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3",
    "encodings", "pydoc_data", "ensurepip", "turtledemo", "idlelib",
})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def pydoc_topic_documents() -> list[tuple[str, str]]:
    """(name, text) for every pydoc topic, in a stable order."""
    from pydoc_data.topics import topics

    return [(f"pydoc_data:{name}", topics[name]) for name in sorted(topics)]


@functools.lru_cache(maxsize=1)
def stdlib_docstring_documents() -> tuple[tuple[str, str], ...]:
    """(name, text) per standard-library module: its docstrings (module, classes, functions) in
    source order, blank-line separated.  Files are walked in sorted order and parsed, never
    imported; unreadable files are skipped.  Empty when the install ships no ``.py`` sources."""
    root = sysconfig.get_paths().get("stdlib") or ""
    if not os.path.isdir(root):
        return ()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(("config-", ".")))
        files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    docs = []
    for path in sorted(files, key=lambda p: os.path.relpath(p, root).replace(os.sep, "/")):
        try:
            with open(path, "rb") as fh:
                tree = ast.parse(fh.read())
        except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
            continue
        parts = [d for d in (ast.get_docstring(n) for n in _documented(tree)) if d and d.strip()]
        if parts:
            docs.append((f"stdlib:{os.path.relpath(path, root).replace(os.sep, '/')}", "\n\n".join(parts)))
    return tuple(docs)


def _documented(node):
    """Modules, classes and functions in source order, visiting statement bodies only."""
    if isinstance(node, _DOC_NODES):
        yield node
    for name in ("body", "orelse", "finalbody", "handlers", "cases"):
        for child in getattr(node, name, None) or ():
            if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                yield from _documented(child)


def default_documents() -> list[tuple[str, str]]:
    """(name, text) for the whole embedded corpus: the pydoc topics, then the stdlib docstrings."""
    return pydoc_topic_documents() + list(stdlib_docstring_documents())


def probe_text(max_chars: int = 8000) -> str:
    """A fixed slice of the corpus (the compound-statement topics) for quick measurements."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[t] for t in PROBE_TOPICS)[:max_chars]
