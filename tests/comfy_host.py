"""Locating and starting the real ComfyUI host in-process for the tests.

Order: $COMFYUI_PATH, the ComfyUI whose custom_nodes/ contains this checkout, then ~/ComfyUI.
The pack itself is loaded the way ComfyUI loads custom nodes (nodes.load_custom_node), never by
putting the pack root on sys.path: its `nodes/` folder would shadow ComfyUI's `nodes` module.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_comfyui(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")) \
        and os.path.isfile(os.path.join(path, "nodes.py"))


def find_comfyui() -> Optional[str]:
    explicit = os.environ.get("COMFYUI_PATH")
    if explicit:
        return os.path.abspath(explicit) if _is_comfyui(explicit) else None
    parent = os.path.dirname(PACK_DIR)
    if os.path.basename(parent) == "custom_nodes" and _is_comfyui(os.path.dirname(parent)):
        return os.path.dirname(parent)
    home = os.path.expanduser("~/ComfyUI")
    return home if _is_comfyui(home) else None


def start_host(comfy_root: str, workdir: str) -> None:
    """Import ComfyUI in-process on the CPU, with models/input/output folders under `workdir`."""
    import asyncio
    import logging

    if comfy_root not in sys.path:
        sys.path.insert(0, comfy_root)
    from comfy.cli_args import args
    args.cpu = True
    import utils.extra_config  # noqa: F401  (ComfyUI's own utils package must win over any other)
    import folder_paths

    for sub in ("input", "output", "temp", "models/checkpoints", "models/loras"):
        os.makedirs(os.path.join(workdir, sub), exist_ok=True)
    folder_paths.set_input_directory(os.path.join(workdir, "input"))
    folder_paths.set_output_directory(os.path.join(workdir, "output"))
    folder_paths.set_temp_directory(os.path.join(workdir, "temp"))
    for name in ("checkpoints", "loras"):
        _, extensions = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = ([os.path.join(workdir, "models", name)], extensions)

    import nodes
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(PACK_DIR)):
        raise RuntimeError(f"ComfyUI could not load the pack from {PACK_DIR}; see the log above.")
    logging.getLogger().setLevel(logging.INFO)


def start_host_for_tool(description: str, workdir_prefix: str, argv: Optional[list[str]] = None) -> None:
    """Command line of the tools/ scripts: `--comfyui ROOT`, then the host started in a temp workdir."""
    import argparse
    import logging
    import tempfile

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--comfyui", help="ComfyUI root (default: $COMFYUI_PATH, the enclosing ComfyUI, ~/ComfyUI)")
    args = parser.parse_args(argv)
    comfy_root = args.comfyui or find_comfyui()
    if not comfy_root:
        parser.error("ComfyUI not found; pass --comfyui or set COMFYUI_PATH")
    start_host(os.path.abspath(os.path.expanduser(comfy_root)), tempfile.mkdtemp(prefix=workdir_prefix))


def compute_in_bf16(model) -> None:
    """Let a bf16- or fp8-weight denoiser compute in bf16 on the CPU, as it does on a GPU with bf16 support.

    On the CPU ComfyUI keeps bf16 weights but casts each one to fp32 per layer (manual_cast_dtype fp32):
    measured on this machine, a 64 px SDXL forward then takes 3.8 s instead of 0.9 s, and a training step
    keeps fp32 copies of the weights for the backward pass (about +10 GB; +8 GB for Anima). Without a
    manual-cast dtype the model's inputs, and so every layer, run in the weights' bf16. fp8 weights (Krea 2 as
    users load it) cannot compute as they are: they are cast to bf16 per layer, as on a GPU.
    """
    import torch

    model.model.manual_cast_dtype = None if model.model.get_dtype() == torch.bfloat16 else torch.bfloat16


def pack(submodule: str):
    """A module of the pack as ComfyUI loaded it (e.g. pack("nodes.host.lag_patch"))."""
    import importlib

    return importlib.import_module(PACK_DIR.replace(".", "_x_") + "." + submodule)


def executor_inputs(cls, inputs: dict) -> dict:
    """`inputs` as the executor passes them to a V3 node: each wrapped in a list for is_input_list nodes."""
    if not cls.define_schema().is_input_list:
        return inputs
    return {name: value if isinstance(value, list) else [value] for name, value in inputs.items()}


def _execute(node_id: str, inputs: dict):
    import nodes
    import torch

    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    with torch.inference_mode():
        if hasattr(cls, "execute") and hasattr(cls, "define_schema"):
            return cls.execute(**executor_inputs(cls, inputs))
        return getattr(cls(), cls.FUNCTION)(**inputs)


def run_node(node_id: str, **inputs):
    """Execute one node the way ComfyUI does (inference mode), returning its outputs as a tuple."""
    output = _execute(node_id, inputs)
    if isinstance(output, (tuple, dict)):  # a V1 node
        return output
    return tuple(output.result) if output.result is not None else ()


def node_ui(node_id: str, **inputs) -> dict:
    """What one node shows in the frontend ({"images": [...]} etc.), as ComfyUI's executor reads it from V1
    and V3 nodes alike (a stock node may be either, depending on the host's version)."""
    output = _execute(node_id, inputs)
    ui = output.get("ui") if isinstance(output, dict) else output.ui
    return ui.as_dict() if hasattr(ui, "as_dict") else (ui or {})


class RecordingServer:
    """What PromptExecutor needs of ComfyUI's PromptServer; the messages it would send are kept."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:
        pass


def prompt_executor(server=None):
    """An execution.PromptExecutor built the way ComfyUI's main.py builds it with --cache-classic.

    main.py passes the cache settings as cache_size before ComfyUI 0.4 and as cache_args after; the
    constructor's signature says which host this is.
    """
    import inspect

    import execution

    server = server if server is not None else RecordingServer()
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, cache_size=0)
