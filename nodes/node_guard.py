"""What every PerRes node's execute does before its own work, in one place.

1. The host self-check (nodes/host/entry_points.py): a node whose host entry points are missing refuses to run
   with the self-check's message, instead of failing somewhere inside.
2. Finite numbers: ComfyUI's validation lets NaN through every FLOAT input (NaN is neither below a minimum nor
   above a maximum), and workflow JSON written by scripts or broken widgets carries NaN and ±inf. Every FLOAT
   input of every node, found from the node's schema, is checked here (the nodes keep no checks of their own).
3. Errors name the node: any PerResError raised inside is prefixed with the node's display name.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from comfy_api.latest import io

from ..perres_core.errors import PerResError
from .host.entry_points import require_host


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


@dataclass(frozen=True)
class _FloatInput:
    name: str
    minimum: float | None
    maximum: float | None
    default: float | None


@dataclass(frozen=True)
class _NodeFacts:
    node_id: str
    display_name: str
    floats: tuple[_FloatInput, ...]


_FACTS: dict[tuple[str, str], _NodeFacts] = {}


def _facts(cls: type[io.ComfyNode]) -> _NodeFacts:
    """The node's id, display name and FLOAT inputs, read from its schema once. Keyed by name: ComfyUI's executor
    runs a per-run copy of the registered class (PREPARE_CLASS_CLONE)."""
    key = (cls.__module__, cls.__qualname__)
    if key not in _FACTS:
        schema = cls.define_schema()
        floats = tuple(_FloatInput(i.id, i.min, i.max, i.default) for i in schema.inputs
                       if isinstance(i, io.Float.Input))
        _FACTS[key] = _NodeFacts(schema.node_id, schema.display_name or schema.node_id, floats)
    return _FACTS[key]


def _number(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def require_finite(facts: _NodeFacts, inputs: dict[str, Any]) -> None:
    """Refuse NaN, ±inf and non-numbers in any FLOAT input that is given (input-list nodes get a list of values
    per input). A linked value is never checked by ComfyUI's validation, so another pack can hand over anything."""
    for spec in facts.floats:
        if spec.name not in inputs:  # an optional input left unconnected
            continue
        given = inputs[spec.name]
        for value in given if isinstance(given, list) else [given]:
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PerResError(f"{spec.name} must be a finite number, got {value}: set it to a number from "
                                  f"{_number(spec.minimum)} to {_number(spec.maximum)} (default "
                                  f"{_number(spec.default)}). A script or a broken widget may have written {value} "
                                  "into the workflow.")


def guarded(execute: Callable[..., io.NodeOutput]) -> Callable[..., io.NodeOutput]:
    """Decorates a node's execute (under @classmethod): host self-check, finite numbers, errors named by node."""
    @functools.wraps(execute)
    def run(cls, **inputs: Any) -> io.NodeOutput:
        facts = _facts(cls)
        with reported_as(facts.display_name):
            require_host(facts.node_id)
            require_finite(facts, inputs)
            return execute(cls, **inputs)
    return run

