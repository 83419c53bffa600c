"""Shared fixtures: the real ComfyUI host, the random SD1.5 checkpoint, and helpers to run nodes."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the tests' own helper modules
from comfy_host import (PACK_DIR, compute_in_bf16, find_comfyui, node_ui, pack, prompt_executor,  # noqa: E402,F401
                        run_node, start_host)
from sd15_checkpoint import CHECKPOINT_NAME  # noqa: E402


def _load_standalone_core() -> None:
    """perres_core as a top-level package for host-free tests (it never imports ComfyUI).

    The pack root itself is never put on sys.path: its nodes/ folder would shadow ComfyUI's nodes module.
    """
    init = os.path.join(PACK_DIR, "perres_core", "__init__.py")
    spec = importlib.util.spec_from_file_location("perres_core", init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["perres_core"] = module
    spec.loader.exec_module(module)


_load_standalone_core()

_HOST_ROOT = find_comfyui()
_WORKDIR = tempfile.mkdtemp(prefix="perres-tests-")
if _HOST_ROOT is not None:
    start_host(_HOST_ROOT, _WORKDIR)


def pytest_report_header(config):
    return f"ComfyUI host: {_HOST_ROOT or 'NOT FOUND (host tests skipped)'}; workdir {_WORKDIR}"


@pytest.fixture(scope="session")
def host_root() -> str:
    if _HOST_ROOT is None:
        pytest.skip("no ComfyUI host found (set COMFYUI_PATH)")
    return _HOST_ROOT


@pytest.fixture(scope="session")
def workdir(host_root) -> str:
    return _WORKDIR


@pytest.fixture(scope="session")
def checkpoint_name(workdir) -> str:
    """The random SD1.5-architecture checkpoint, built once and cached between runs."""
    from sd15_checkpoint import link_sd15_checkpoint

    link_sd15_checkpoint(workdir, CHECKPOINT_NAME)
    return CHECKPOINT_NAME


@pytest.fixture(scope="session")
def sd15(checkpoint_name):
    """(model, clip, vae) from the stock CheckpointLoaderSimple."""
    model, clip, vae = run_node("CheckpointLoaderSimple", ckpt_name=checkpoint_name)
    return model, clip, vae


@pytest.fixture(scope="session")
def concept_images() -> torch.Tensor:
    """Four 64 px synthetic 'concept' images: a bright square on a varying background."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(4, 64, 64, 3, generator=generator) * 0.3
    images[:, 16:48, 16:48, 0] = 0.9
    return images


@contextlib.contextmanager
def bf16_unet():
    """Load UNets in bf16 (ComfyUI's --bf16-unet) while the block runs.

    The random SDXL checkpoint's 2.6 G UNet parameters take 10 GB in fp32, the CPU host's default; in bf16
    they take 5 GB and this CPU computes bf16 matrix products natively (AMX-BF16). SD1.5 tests keep fp32.
    """
    from comfy.cli_args import args

    previous = args.bf16_unet
    args.bf16_unet = True
    try:
        yield
    finally:
        args.bf16_unet = previous


@pytest.fixture(scope="session")
def sdxl_checkpoint_name(workdir) -> str:
    """The random SDXL-architecture checkpoint (tests/sdxl_checkpoint.py), built once and cached between runs."""
    from sdxl_checkpoint import CHECKPOINT_NAME as SDXL_NAME, link_sdxl_checkpoint

    link_sdxl_checkpoint(workdir, SDXL_NAME)
    return SDXL_NAME


@pytest.fixture(scope="session")
def sdxl(sdxl_checkpoint_name):
    """(model, clip, vae) of the random SDXL checkpoint from the stock CheckpointLoaderSimple, UNet in bf16
    and computing in bf16 (compute_in_bf16).

    Loaded once per run (7 GB): the tests that use it are marked `sdxl` and run last (see
    pytest_collection_modifyitems), after the tests that start ComfyUI servers of their own."""
    release_freed_memory()  # loading holds the 7 GB file's tensors next to the model for a moment
    with bf16_unet():
        loaded = run_node("CheckpointLoaderSimple", ckpt_name=sdxl_checkpoint_name)
    compute_in_bf16(loaded[0])
    return loaded


def release_freed_memory() -> None:
    """Give memory that earlier tests freed back to the system: glibc keeps freed blocks in the process heap
    (measured: the suite's process held about 8 GiB before the SDXL load, 4 GiB of it the SD1.5 model)."""
    import ctypes
    import gc

    import comfy.model_management

    gc.collect()
    comfy.model_management.soft_empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc
            pass


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `first` run before all others: each loads a large model in a process of its own, best while
    the suite's process is still small. Tests marked `sdxl` run after all others (in their own order): the SDXL
    model they share stays loaded until the run ends, and next to it the SD1.5 model and the servers other
    tests start would not fit the suite's 16 GiB."""
    def place(item) -> int:
        return -1 if item.get_closest_marker("first") else int(item.get_closest_marker("sdxl") is not None)
    items.sort(key=place)
