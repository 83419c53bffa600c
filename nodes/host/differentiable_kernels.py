"""The host's fused inference kernels, made differentiable while PerRes trains.

Newer ComfyUI runs parts of some models through comfy_kitchen's fused kernels (RMSNorm with RoPE, RoPE alone),
registered as torch custom ops without an autograd formula: a backward pass through them fails with "Trying to
backward through comfy_kitchen.rms_rope_split_half.default but no autograd formula was registered".
ComfyUI's own trainer sets comfy.model_management.in_training, which some models honour by taking a plain
torch path (Flux's and Krea 2's RoPE, LTX); Anima's self-attention (comfy/ldm/cosmos/predict2.py in 0.33.0)
does not look at it. So while PerRes trains, it sets that flag as the stock trainer does, and the kernels the
models call (comfy.quant_ops.ck.<name>) point at comfy_kitchen's own eager reference implementations: the same
arithmetic in plain torch, which autograd differentiates. Both are restored when training ends, also on error.
Hosts without comfy_kitchen (0.3.64) have nothing to replace.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Iterator

from .entry_points import comfy  # the host's modules, imported and checked in one place

# The kernels models call in their forward pass that have an eager (plain torch) twin of the same signature.
# The in-place variants (name_) are inference-only by design and never reached while training.
ROPE_KERNELS = ("apply_rope", "apply_rope1", "apply_rope_split_half", "apply_rope_split_half1", "rms_rope",
                "rms_rope1", "rms_rope_split_half", "rms_rope_split_half1")


def _kitchen_and_eager():
    """(the comfy_kitchen module the host calls, its eager backend), or None where the host has neither."""
    quant_ops = sys.modules.get("comfy.quant_ops")
    kitchen = getattr(quant_ops, "ck", None)
    if kitchen is None:
        return None
    try:
        eager = importlib.import_module("comfy_kitchen.backends.eager")
    except ImportError:
        return None
    return kitchen, eager


@contextlib.contextmanager
def differentiable_host_kernels() -> Iterator[None]:
    """While the block runs: the host's training flag on, its fused RoPE kernels replaced by their eager twins."""
    management = comfy.model_management
    had_flag = hasattr(management, "in_training")
    previous_flag = getattr(management, "in_training", False)
    replaced: dict[str, object] = {}
    found = _kitchen_and_eager()
    try:
        if had_flag:
            management.in_training = True
        if found is not None:
            kitchen, eager = found
            for name in ROPE_KERNELS:
                if hasattr(kitchen, name) and callable(getattr(eager, name, None)):
                    replaced[name] = getattr(kitchen, name)
                    setattr(kitchen, name, getattr(eager, name))
        yield
    finally:
        if found is not None:
            for name, kernel in replaced.items():
                setattr(found[0], name, kernel)
        if had_flag:
            management.in_training = previous_flag
