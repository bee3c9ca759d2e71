"""Which native op schemas a compiled ``setok_kernels._C`` was built for.

The library registers kernels for the ``setok::native_*`` schemas defined in
``_native.py``. Loading a library built against other schemas does not fail
politely: torch checks each kernel's inferred schema in the library's static
initialisers and aborts the process. So the build embeds a fingerprint of the
schemas in the binary (setup.py), and ``_native`` reads it from the file
*before* loading it. Torch-free: setup.py loads this module by path.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from typing import Optional

MARKER = b"SETOK_SCHEMA_FINGERPRINT="
_FOUND = re.compile(re.escape(MARKER) + rb"(s[0-9a-f]{16})")


def fingerprint(schemas: dict) -> str:
    """``s`` + 16 hex digits over the op names and schema strings (an identifier, so a macro value)."""
    text = json.dumps(sorted(schemas.items()), separators=(",", ":"))
    return "s" + hashlib.sha256(text.encode()).hexdigest()[:16]


def schemas_in_source(path: str) -> dict:
    """The ``_SCHEMAS`` dict literal of ``_native.py``, read without importing it (no torch)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_SCHEMAS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"{path}: no _SCHEMAS dict literal")


def embedded_fingerprint(library_path: str) -> Optional[str]:
    """The fingerprint compiled into a library, or None (built before fingerprints existed)."""
    with open(library_path, "rb") as f:
        found = _FOUND.search(f.read())
    return found.group(1).decode() if found else None
