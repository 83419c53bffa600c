"""The host self-check (nodes/host/entry_points.py), on the real host: entry points removed or changed by
monkeypatching ComfyUI's own modules, a host module that fails to import, and what the user then sees."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import pack, run_node
from host_helpers import untrained_residuals

pytestmark = pytest.mark.every_host  # the self-check reads each host's own entry points

PACK_NODES = ("PerResLoadConceptImages", "PerResSuggestClassWord", "PerResTrainResiduals", "PerResSaveResiduals",
              "PerResLoadResiduals", "PerResApplyResiduals", "PerResLAGSampling", "PerResLAGConcept",
              "PerResLAGLoRA", "PerResLAGMaskPreview")
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def entry_points():
    return pack("nodes.host.entry_points")


def perres_error():
    return pack("perres_core.errors").PerResError


def test_the_running_host_provides_every_entry_point(host_root):
    assert entry_points().host_problems() == []


def test_every_node_that_needs_an_entry_point_exists():
    import nodes

    needed = {node for entry in entry_points().ENTRY_POINTS for node in entry.needed_by}
    assert needed <= set(PACK_NODES) <= set(nodes.NODE_CLASS_MAPPINGS)


def test_tested_hosts_are_the_ci_hosts():
    """The range the self-check's message names is the one CI tests (the floor in pyproject.toml and README:
    tests/test_ci_provision.py)."""
    with open(os.path.join(os.path.dirname(TESTS_DIR), ".ci", "comfyui-hosts"), encoding="utf-8") as f:
        pinned = [line.split()[1] for line in f if line.strip() and not line.startswith("#")]
    assert tuple(pinned) == entry_points().TESTED_HOSTS


def expect_host_error(node_name: str, *fragments: str, call) -> str:
    import comfyui_version

    with pytest.raises(perror := perres_error()) as info:
        call()
    assert info.type is perror
    message = str(info.value)
    assert message.startswith(f"{node_name}: this ComfyUI (ComfyUI {comfyui_version.__version__}) lacks"), message
    for fragment in fragments + ("tested on ComfyUI 0.3.64 to 0.33.0",):
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_a_removed_function_refuses_the_nodes_that_need_it_and_no_other(sd15, monkeypatch, workdir):
    import comfy.lora

    residuals = untrained_residuals(0)
    monkeypatch.delattr(comfy.lora, "load_lora")
    expect_host_error("PerRes Apply Residuals", "comfy.lora.load_lora(lora, to_load, log_missing): missing",
                      call=lambda: run_node("PerResApplyResiduals", model=sd15[0], residuals=residuals, strength=1.0))
    # nodes that do not need comfy.lora.load_lora still work on the same host
    (name,) = run_node("PerResSaveResiduals", residuals=residuals, filename_prefix="perres_host_check/removed")
    (loaded,) = run_node("PerResLoadResiduals", residual_name=name)
    assert loaded.concept == residuals.concept


def test_a_changed_signature_refuses_lag_and_leaves_apply_working(sd15, monkeypatch):
    import comfy.model_patcher

    def add_wrapper_with_key(self, kind, key, wrapper):  # a host that renamed the parameters
        raise AssertionError("LAG must not get this far")

    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "add_wrapper_with_key", add_wrapper_with_key)
    residuals = untrained_residuals(0)
    expect_host_error("PerRes LAG Sampling", "ModelPatcher.add_wrapper_with_key(wrapper_type, key, wrapper): changed: "
                      "no parameter 'wrapper_type'",
                      call=lambda: run_node("PerResLAGSampling", model=sd15[0], clip=sd15[1], prompt="a sks dog",
                                            concept_words="", strength=1.0, threshold="median", quantile=0.5,
                                            start_percent=0.0, end_percent=1.0, outside_window="full residual",
                                            residuals=residuals))
    (patched,) = run_node("PerResApplyResiduals", model=sd15[0], residuals=residuals, strength=1.0)
    assert patched is not sd15[0] and len(patched.patches) == len(residuals.layers)


def test_the_console_names_the_problem_once_at_load(monkeypatch, caplog):
    import comfy.patcher_extension

    monkeypatch.delattr(comfy.patcher_extension.WrappersMP, "OUTER_SAMPLE")
    with caplog.at_level(logging.WARNING, logger="perres"):
        entry_points().log_host_check()
    (record,) = [r for r in caplog.records if r.name == "perres"]
    message = record.getMessage()
    for fragment in ("comfy.patcher_extension.WrappersMP.OUTER_SAMPLE: missing", "tested on ComfyUI 0.3.64 to 0.33.0",
                     "Affected nodes: PerResLAGSampling."):
        assert fragment in message, message


def test_a_host_module_that_fails_to_import_leaves_every_node_registered(host_root, tmp_path):
    """A fresh process: ComfyUI starts, then comfy.weight_adapter cannot be imported any more and io.LossMap is gone
    when the pack loads (as if a newer host had moved them). The pack still registers all its nodes, says so
    once, and LAG Sampling and Train Residuals refuse with the self-check's message while Load Concept Images
    works."""
    script = textwrap.dedent(f"""
        import asyncio, json, logging, os, sys
        sys.path.insert(0, {TESTS_DIR!r})
        records = []
        class Keep(logging.Handler):
            def emit(self, record): records.append(record.getMessage())
        logging.getLogger("perres").addHandler(Keep())
        import comfy_host
        sys.path.insert(0, {host_root!r})
        from comfy.cli_args import args
        args.cpu = True
        import utils.extra_config, nodes  # ComfyUI itself has imported comfy.weight_adapter by now
        sys.modules["comfy.weight_adapter"] = None  # later imports of it fail
        from comfy_api.latest import io
        del io.LossMap  # a V3 type the Train node's schema uses
        comfy_host.start_host({host_root!r}, {str(tmp_path)!r})
        import nodes
        from PIL import Image
        os.makedirs({str(tmp_path / "input" / "pics")!r}, exist_ok=True)
        Image.new("RGB", (64, 64), (200, 30, 30)).save({str(tmp_path / "input" / "pics" / "a.png")!r})
        images = comfy_host.run_node("PerResLoadConceptImages", folder="pics", resolution=64)
        def refusal(node_id, **inputs):
            try:
                comfy_host.run_node(node_id, **inputs)
            except Exception as exc:
                return str(exc)
        lag = refusal("PerResLAGSampling", model=None, clip=None, prompt="a", concept_words="", strength=1.0,
                      threshold="median", quantile=0.5, start_percent=0.0, end_percent=1.0,
                      outside_window="full residual")
        train = refusal("PerResTrainResiduals", images=[None], model=[None])
        print("RESULT " + json.dumps(dict(registered=sorted(k for k in nodes.NODE_CLASS_MAPPINGS
                                                            if k.startswith("PerRes")),
                                          images=len(images[0]), lag=lag, train=train, log=records)))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COMFYUI_PATH": host_root})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["registered"] == sorted(PACK_NODES)
    assert result["images"] == 1
    assert result["lag"] and result["lag"].startswith("PerRes LAG Sampling: this ComfyUI"), result["lag"]
    assert "comfy.weight_adapter.LoRAAdapter: missing" in result["lag"]
    assert result["train"] and result["train"].startswith("PerRes Train Residuals: this ComfyUI"), result["train"]
    assert "comfy_api.latest.io.LossMap: missing" in result["train"]
    warnings = [m for m in result["log"] if "lacks what PerRes needs" in m]
    assert len(warnings) == 1, result["log"]
    assert "comfy.weight_adapter.LoRAAdapter: missing" in warnings[0] and "io.LossMap: missing" in warnings[0]


def test_a_node_whose_schema_breaks_is_left_out_alone(monkeypatch, caplog):
    """ComfyUI drops a whole pack when registering one node raises; PerRes leaves out that node only."""
    import asyncio

    nodes_pkg = pack("nodes")
    broken = nodes_pkg.NODES[0]

    def define_schema(cls):
        raise TypeError("Schema() got an unexpected keyword argument 'hidden'")

    monkeypatch.setattr(broken, "define_schema", classmethod(define_schema))
    with caplog.at_level(logging.ERROR, logger="perres"):
        listed = asyncio.run(nodes_pkg.PerResExtension().get_node_list())
    assert broken not in listed and listed == nodes_pkg.NODES[1:]
    assert any(f"{broken.__name__} cannot be registered" in r.getMessage() for r in caplog.records)
