"""The change a concept makes to one layer, in residual form: f̂(x) = W·x + M⊙(ΔW·x).

LAG (paper Eq. 3) never merges ΔW into a weight: it adds ΔW·x to the layer's output, masked per image
location. Two forms cover every SD1.x LoRA that ComfyUI reads:

* LowRankDelta: ΔW = scale·up·down (plain LoRA, LoCon, PerRes residuals). The input goes through `down`
  (a Linear, or a conv with the layer's own kernel, stride, padding and dilation), the mask, then `up`
  (a Linear or 1×1 conv), so ΔW is never formed and the cost is that of two thin products.
* DenseDelta: a ΔW (and/or Δbias) tensor, for adapters without such factors (LoHa, LoKr, DoRA, full
  diffs). It is computed once per layer by the host and applied with the layer's own geometry.

A mask that is constant over channels commutes with a Linear or 1×1 `up`, so it is applied to the
cheapest tensor: the r-channel intermediate of a low-rank delta.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ConvGeometry:
    """stride, padding, dilation and groups of a conv layer; the delta must use the layer's own."""

    stride: tuple[int, ...] = (1, 1)
    padding: Union[tuple[int, ...], str] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1

    @classmethod
    def of(cls, conv: torch.nn.Conv2d) -> "ConvGeometry":
        return cls(tuple(conv.stride), conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
                   tuple(conv.dilation), conv.groups)


def _masked(tensor: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return tensor if mask is None else tensor * mask.to(tensor.dtype)


@dataclass
class LowRankDelta:
    """ΔW·x = scale·up(down(x)) for a Linear (up (m, r), down (r, n)) or a conv layer (down (r, n, kh, kw)
    with the layer's geometry, up (m, r) or (m, r, 1, 1))."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float = 1.0
    geometry: Optional[ConvGeometry] = None          # None: a Linear layer
    _cache: dict = field(default_factory=dict, repr=False)

    def factors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale·up, down) on the sampling device, cast once (the stored factors are never moved)."""
        key = (device, dtype)
        if key not in self._cache:
            up = self.up.detach().float() * self.scale
            down = self.down.detach()
            if self.geometry is not None:
                up = up.reshape(up.shape[0], up.shape[1], 1, 1)
                down = down if down.dim() == 4 else down.reshape(*down.shape, 1, 1)
            self._cache[key] = (up.to(device, dtype), down.to(device, dtype))
        return self._cache[key]

    def __call__(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return low_rank(x, *self.factors(x.device, x.dtype), self.geometry, mask)

    def add_into(self, output: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> bool:
        """output += ΔW·x (masked), in place, with `up` fused into one GEMM that accumulates into the output
        (2.4× faster than a product and an add on the CPU for rank 32). Only for a Linear whose output has
        x's dtype and is contiguous; returns False, doing nothing, otherwise."""
        if self.geometry is not None or output.dtype != x.dtype or not output.is_contiguous():
            return False
        up, down = self.factors(x.device, x.dtype)
        hidden = _masked(F.linear(x, down), mask)
        output.view(-1, output.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), up.t())
        return True


def low_rank(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, geometry: Optional[ConvGeometry],
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """up(M⊙down(x)): factors already in x's dtype, shaped (m, r)/(r, n) for a Linear or (m, r, 1, 1)/
    (r, n, kh, kw) for a conv with `geometry`."""
    if geometry is None:
        return F.linear(_masked(F.linear(x, down), mask), up)
    g = geometry
    hidden = F.conv2d(x, down, None, g.stride, g.padding, g.dilation, g.groups)
    return F.conv2d(_masked(hidden, mask), up)


@dataclass
class DenseDelta:
    """ΔW·x (or Δbias) with ΔW of the layer's weight shape, applied with the layer's geometry.

    `compute(device)` returns the fp32 ΔW (Δbias); it runs once per device, on the device the layer runs on
    (the host's weight arithmetic for adapters such as LoHa, LoKr or DoRA may depend on the current W).
    """

    compute: Callable[[torch.device], torch.Tensor]
    geometry: Optional[ConvGeometry] = None
    is_bias: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    def tensor(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if (device, dtype) not in self._cache:
            fp32 = self._cache.get((device, None))
            if fp32 is None:
                fp32 = self._cache[(device, None)] = self.compute(device).detach()
            self._cache[(device, dtype)] = fp32.to(dtype)
        return self._cache[(device, dtype)]

    def __call__(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        delta = self.tensor(x.device, x.dtype)
        if self.is_bias:   # Δb at every location of the output
            return _masked(delta.reshape(-1, 1, 1) if self.geometry is not None else delta, mask)
        if self.geometry is None:
            return _masked(F.linear(x, delta), mask)
        g = self.geometry
        return _masked(F.conv2d(x, delta, None, g.stride, g.padding, g.dilation, g.groups), mask)


@dataclass(frozen=True)
class DeltaSum:
    """Several changes of one layer (a weight and a bias delta)."""

    parts: tuple

    def __call__(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        total = self.parts[0](x, mask)
        for part in self.parts[1:]:
            total = total + part(x, mask)
        return total


LayerDelta = Union[LowRankDelta, DenseDelta, DeltaSum]


def changes_bias(delta: LayerDelta) -> bool:
    """Whether the change includes a bias change (it then moves a zero input's output too)."""
    if isinstance(delta, DeltaSum):
        return any(changes_bias(part) for part in delta.parts)
    return isinstance(delta, DenseDelta) and delta.is_bias


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              dtype: torch.dtype = torch.float32, padding: int = 0) -> torch.Tensor:
    """softmax(QKᵀ/√d)·V with merged heads, (B, N, h·d) → (B, N, h·d), computed in `dtype`. `padding`: zero
    keys and values left off after the last of k and v (a zero-padded context): they add e⁰ each to the
    softmax's denominator and nothing to its numerator, so one zero column weighted by their number stands for
    them all."""
    batch, tokens, inner = q.shape
    d = inner // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2)

    mask = None
    if padding:
        k, v = (torch.cat([t, t.new_zeros(t.shape[0], 1, t.shape[2])], dim=1) for t in (k, v))
        mask = torch.zeros(1, 1, 1, k.shape[1], dtype=dtype, device=q.device)
        mask[..., -1] = math.log(padding)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, tokens, inner)
