"""Running a ComfyUI UNet with residuals added at its proj_out layers, through forward hooks.

The hooks compute out + M·(ΔW·x) (paper Eq. 3 with M ≡ 1 for training and global use, or the LAG mask)
and exist only while a `with` block runs, so other clones sharing the same UNet are never affected.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

from ...perres_core.families import ModelFamily, TransformerSlot
from ...perres_core.residual import LowRankResidual
from .model import transformer_modules

# (slot, layer input x: (B, C, h, w) for a 1×1 conv, (B, N, C) for a Linear) -> delta to add, or None
DeltaFn = Callable[[TransformerSlot, torch.Tensor], Optional[torch.Tensor]]


@contextlib.contextmanager
def proj_out_hooks(unet: torch.nn.Module, family: ModelFamily, delta_fn: DeltaFn) -> Iterator[None]:
    """Add delta_fn(slot, x) to the output of each of the family's proj_out layers while the block runs."""
    handles = []

    def make_hook(slot: TransformerSlot):
        def hook(module, args, output):
            delta = delta_fn(slot, args[0])
            return output if delta is None else output + delta.to(output.dtype)
        return hook

    try:
        for slot, transformer in transformer_modules(unet, family):
            handles.append(transformer.proj_out.register_forward_hook(make_hook(slot)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def full_residual(layers: dict[str, LowRankResidual]) -> DeltaFn:
    """ΔW·x everywhere (training, and LAG outside its active steps)."""
    def delta(slot: TransformerSlot, x: torch.Tensor) -> Optional[torch.Tensor]:
        layer = layers.get(slot.proj_out)
        return None if layer is None else layer(x)
    return delta
