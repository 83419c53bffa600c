"""Running a ComfyUI denoiser with residuals added at its residual layers, through forward hooks.

The hooks compute out + ΔW·x (paper Eq. 3 with M ≡ 1: training and the suggester) and exist only while a
`with` block runs, so other clones sharing the same denoiser are never affected. (LAG adds M·ΔW·x with its own
hooks, nodes/host/lag_patch.py.)
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch

from ...perres_core.errors import PerResError
from ...perres_core.residual import LowRankResidual


@contextlib.contextmanager
def residual_hooks(denoiser: torch.nn.Module, layers: Mapping[str, LowRankResidual]) -> Iterator[None]:
    """Add layer(x) = ΔW·x to the output of the module at each path of `layers` while the block runs."""
    handles = []

    def make_hook(residual: LowRankResidual):
        def hook(module, args, output):
            return output + residual(args[0]).to(output.dtype)
        return hook

    try:
        for path, residual in layers.items():
            try:
                module = denoiser.get_submodule(path)
            except AttributeError:
                raise PerResError(f"the model has no layer {path} for the residual; it was made for another "
                                  "model.") from None
            handles.append(module.register_forward_hook(make_hook(residual)))
        yield
    finally:
        for handle in handles:
            handle.remove()
