"""The test cache of random-weight models: each file is built once, atomically, and linked into a test's models
folder. $PERRES_TEST_CACHE or ~/.cache/perres-tests; delete a file there to build it again."""
from __future__ import annotations

import logging
import os
from typing import Callable


def cached_model(name: str, build: Callable[[str], object], about: str) -> str:
    """The cache's `name`, written by build(path) on first use: into NAME.partial, renamed when complete, so an
    interrupted build never leaves a file that looks finished."""
    cache_dir = os.environ.get("PERRES_TEST_CACHE", os.path.expanduser("~/.cache/perres-tests"))
    os.makedirs(cache_dir, exist_ok=True)
    cached = os.path.join(cache_dir, name)
    if not os.path.exists(cached):
        logging.getLogger("perres.tests").info("building %s (once, %s) ...", cached, about)
        partial = cached + ".partial"
        try:
            build(partial)
            os.replace(partial, cached)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return cached


def linked_model(root: str, folder: str, name: str, source: Callable[[], str]) -> str:
    """`root`/models/`folder`/`name` as a symlink to source() (a cached model), made when missing."""
    target = os.path.join(root, "models", folder, name)
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(source(), target)
    return target
