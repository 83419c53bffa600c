"""A pytest plugin (loaded from pyproject.toml) that collects the pack root as a plain folder.

The pack root holds ComfyUI's entry point, `__init__.py`, so pytest would treat it as a Python package
and import it under the checkout's folder name before any test runs. That import fails when the folder
name is not an identifier (`ComfyUI-PerRes`, `perres-main`), and elsewhere it would import the pack
outside ComfyUI. The tests load the pack the way ComfyUI does instead (tests/comfy_host.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parent.parent


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path: Path, parent: pytest.Collector):
    if path.resolve() == PACK_ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None
