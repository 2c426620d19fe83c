"""The one place dtop turns results into JSON: every file it writes and every ``--json`` line it prints.

Output is strict JSON (RFC 8259): an undefined number (NaN, +-inf: the IoU of a class absent from
both prediction and label, a ratio over zero) becomes ``null``, never the ``NaN``/``Infinity`` tokens
that ``json.dumps`` writes by default and that strict readers (``jq``, JavaScript, Go) reject.
Files are written atomically (a temporary file in the same folder, then ``os.replace``), so a reader
never sees half a file.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Union


def clean(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, tuples as lists, and numpy / torch scalars
    and arrays as Python numbers and lists (``.tolist()``); anything else is left to :mod:`json`."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if not isinstance(obj, (str, int, bool)) and obj is not None and hasattr(obj, "tolist"):
        return clean(obj.tolist())
    return obj


def dumps(obj: Any, indent: Optional[int] = None) -> str:
    """Strict JSON text of ``obj`` (see :func:`clean`); TypeError for a value JSON cannot hold."""
    return json.dumps(clean(obj), indent=indent, allow_nan=False)


def write_json(path: Union[str, Path], obj: Any, indent: Optional[int] = 1) -> Path:
    """Write ``obj`` to ``path`` as strict JSON (:func:`dumps`, newline-terminated), atomically;
    returns the path. The folder must exist."""
    path = Path(path)
    text = dumps(obj, indent) + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
