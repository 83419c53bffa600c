"""The batch manifest: concept → saved residual file, final loss, seconds; rewritten atomically per concept."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

FORMAT = "perres-batch-manifest/1"


def load_manifest(path: str) -> dict[str, dict[str, Any]]:
    """The concepts recorded so far ({} when there is no manifest yet)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a PerRes batch manifest (format {data.get('format')!r}, expected {FORMAT!r}).")
    return data["concepts"]


def save_manifest(path: str, concepts: dict[str, dict[str, Any]]) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written manifest."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".partial", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"format": FORMAT, "concepts": dict(sorted(concepts.items()))}, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
