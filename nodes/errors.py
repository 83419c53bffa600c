"""Turning pack errors into messages that name the node the user has to fix."""
from __future__ import annotations

import contextlib
from typing import Iterator

from ..perres_core.errors import PerResError


@contextlib.contextmanager
def reported_as(node_name: str) -> Iterator[None]:
    """Prefix any PerResError raised inside with the node's display name."""
    try:
        yield
    except PerResError as exc:
        message = str(exc)
        if message.startswith(node_name):
            raise
        raise PerResError(f"{node_name}: {message}") from exc
