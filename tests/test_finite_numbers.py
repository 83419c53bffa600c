"""NaN and ±inf in every FLOAT input of every PerRes node, through ComfyUI's own validation and executor.

ComfyUI's validation compares a FLOAT widget with its minimum and maximum, which NaN passes; ±inf as a widget
value is refused there, but a linked value (a primitive node, another pack's output, a script) is never checked.
The inputs are enumerated from the node schemas, so a new FLOAT input is covered without touching this file.
"""
from __future__ import annotations

import asyncio
import math
import uuid

import pytest

from conftest import pack, prompt_executor, run_node
from host_helpers import untrained_residuals

pytestmark = pytest.mark.every_host  # each host's own validation and executor

PROVIDED: dict = {}
# What the provider node hands out, by socket type; FLOAT carries the bad number under test.
SOCKETS = ("MODEL", "CLIP", "VAE", "IMAGE", "LATENT", "PERRES_RESIDUALS", "FLOAT")


class AnyType(str):
    """A socket type that accepts every output type (ComfyUI compares types with !=)."""

    def __ne__(self, other) -> bool:
        return False


class _Provide:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's API)
        return {"required": {}}

    RETURN_TYPES = SOCKETS
    FUNCTION = "provide"
    CATEGORY = "testing"

    def provide(self):
        return tuple(PROVIDED[socket] for socket in SOCKETS)


class _Sink:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's API)
        return {"required": {"value": (AnyType("*"),)}}

    RETURN_TYPES = ()
    FUNCTION = "take"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def take(self, value):
        return {}


def float_inputs() -> list[tuple[str, str]]:
    import nodes
    from comfy_api.latest import io

    pack_nodes = sorted(n for n in nodes.NODE_CLASS_MAPPINGS
                        if n.startswith("PerRes") and not n.startswith("PerResTest"))
    found = [(node_id, i.id) for node_id in pack_nodes
             for i in nodes.NODE_CLASS_MAPPINGS[node_id].define_schema().inputs if isinstance(i, io.Float.Input)]
    assert len(found) >= 10  # the 10 of today, at least
    return found


@pytest.fixture(scope="module")
def test_nodes(sd15, workdir):
    import nodes
    import torch

    residuals = untrained_residuals(0)
    (lora_name,) = run_node("PerResSaveResiduals", residuals=residuals, filename_prefix="perres_finite/lora")
    PROVIDED.update(MODEL=sd15[0], CLIP=sd15[1], VAE=sd15[2], IMAGE=torch.rand(2, 64, 64, 3),
                    LATENT={"samples": torch.zeros(1, 4, 8, 8)}, PERRES_RESIDUALS=residuals)
    nodes.NODE_CLASS_MAPPINGS.update(PerResTestProvide=_Provide, PerResTestSink=_Sink)
    try:
        yield lora_name
    finally:
        for name in ("PerResTestProvide", "PerResTestSink"):
            nodes.NODE_CLASS_MAPPINGS.pop(name, None)
        PROVIDED.clear()


def prompt_for(node_id: str, float_name: str, bad: float, linked: bool, lora_name: str) -> dict:
    """Provider → node under test → sink; every required input filled, `float_name` set to `bad`."""
    import nodes
    from comfy_api.latest import io

    inputs = {}
    for spec in nodes.NODE_CLASS_MAPPINGS[node_id].define_schema().inputs:
        socket = spec.get_io_type()
        if spec.id == float_name:
            inputs[spec.id] = ["1", SOCKETS.index("FLOAT")] if linked else bad
        elif spec.optional:
            continue
        elif socket in SOCKETS and socket != "FLOAT":  # other FLOAT inputs keep their defaults
            inputs[spec.id] = ["1", SOCKETS.index(socket)]
        elif isinstance(spec, io.Combo.Input):
            inputs[spec.id] = lora_name if spec.id == "lora_name" else (spec.default or spec.options[0])
        else:
            inputs[spec.id] = spec.default
    return {"1": {"class_type": "PerResTestProvide", "inputs": {}},
            "2": {"class_type": node_id, "inputs": inputs},
            "3": {"class_type": "PerResTestSink", "inputs": {"value": ["2", 0]}}}


def run_prompt(prompt: dict):
    import execution

    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        return False, (error, node_errors)
    executor = prompt_executor()
    executor.execute(prompt, prompt_id, {}, outputs)
    failures = [data for event, data in executor.status_messages if event == "execution_error"]
    return True, (executor.success, failures)


CASES = [("nan", float("nan"), False), ("nan-linked", float("nan"), True), ("inf-linked", float("inf"), True),
         ("minus-inf-linked", float("-inf"), True)]


@pytest.mark.parametrize("case, bad, linked", CASES, ids=[c[0] for c in CASES])
def test_every_float_input_refuses_non_finite_numbers_with_the_nodes_own_error(test_nodes, case, bad, linked):
    import nodes

    PROVIDED["FLOAT"] = bad
    for node_id, name in float_inputs():
        display = nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        valid, (success, failures) = run_prompt(prompt_for(node_id, name, bad, linked, test_nodes))
        assert valid, f"{node_id}.{name}={bad}: ComfyUI's validation refused it: {failures}"
        assert not success, f"{node_id}.{name}={bad} ran"
        (failure,) = failures
        assert failure["node_type"] == node_id
        message = failure["exception_message"]
        assert message.startswith(f"{display}: {name} must be a finite number, got {bad}: set it to a number from"), \
            f"{node_id}.{name}: {message}"
        assert failure["exception_type"].endswith("PerResError"), failure["exception_type"]


def test_infinite_widget_values_are_refused_by_comfyuis_validation(test_nodes):
    """±inf typed into a widget never reaches the node: the host's own range check answers, naming the input."""
    for node_id, name in float_inputs():
        for bad in (math.inf, -math.inf):
            valid, (error, node_errors) = run_prompt(prompt_for(node_id, name, bad, False, test_nodes))
            assert not valid, f"{node_id}.{name}={bad} passed validation"
            details = " ".join(e.get("details", "") + e.get("message", "") for e in node_errors["2"]["errors"])
            assert name in details and "inf" in details, details


def test_the_guard_passes_finite_numbers_and_refuses_everything_else():
    facts = pack("nodes.node_guard")
    guard = facts._facts  # noqa: SLF001 (the guard's own reading of the schema)
    import nodes

    for node_id, name in float_inputs():
        node_facts = guard(nodes.NODE_CLASS_MAPPINGS[node_id])
        facts.require_finite(node_facts, {name: 0.5})
        facts.require_finite(node_facts, {name: [0.5, 1]})
        facts.require_finite(node_facts, {})  # an unconnected optional input
        for bad in ([0.5, float("nan")], "0.5", None):  # a linked value of another type is never validated
            with pytest.raises(pack("perres_core.errors").PerResError, match=f"{name} must be a finite number"):
                facts.require_finite(node_facts, {name: bad})
