"""The queries and keys a block's text attention really uses, read with the block's own modules.

LAG's concept maps (paper Eq. 2) must come from what the attention computes: on a UNet the raw to_q/to_k outputs;
on Anima the cross-attention's per-head RMS norms on top; on Krea 2 the per-head norms and then RoPE, with the text
tokens first in one joint sequence (perres_core.families.TextAttention says which). Reading them with the block's
own projection, norm and the host's RoPE function, on the rows LAG needs only (image queries, text keys), gives the
attention's own logits without the full N×N map and without replacing the attention: another pack's attention
override or replace patch keeps running. tests/dit_lag_checks.py compares these maps with the q and k the host
hands its attention function.

The projections are called through `forward` (not `__call__`): LAG's own hooks on them must not see these reads.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from .entry_points import comfy  # the host's modules, imported and checked in one place
from ...perres_core.families import TextAttention


_SIGNATURES: dict[type, inspect.Signature] = {}


class AttentionReader:
    """One block's text attention module, with what LAG reads from it."""

    def __init__(self, module: torch.nn.Module, attention: TextAttention) -> None:
        self.attention = attention
        self.module = module
        self.query = module.get_submodule(attention.query)
        self.key = module.get_submodule(attention.key)
        self.value = module.get_submodule(attention.value)
        self.output = module.get_submodule(attention.output)
        self.query_norm = module.get_submodule(attention.query_norm) if attention.query_norm else None
        self.key_norm = module.get_submodule(attention.key_norm) if attention.key_norm else None
        self.heads = int(getattr(module, attention.heads))
        self.head_dim = self.query.weight.shape[0] // self.heads
        kind = type(module)
        if kind not in _SIGNATURES:   # readers are made per denoiser call: read each class's signature once
            _SIGNATURES[kind] = inspect.signature(kind.forward)
        self._signature = _SIGNATURES[kind]

    def text_and_rope(self, args: tuple, kwargs: dict) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(the text context, the rotary embedding) among the attention module's call arguments."""
        bound = self._signature.bind_partial(self.module, *args, **kwargs).arguments
        context = bound.get(self.attention.context_argument) if self.attention.context_argument else None
        rope = bound.get(self.attention.rope_argument) if self.attention.rope_argument else None
        return context, rope

    def project_keys(self, text: torch.Tensor) -> torch.Tensor:
        """The key projection of `text`, without LAG's hooks on it."""
        return self.key.forward(text)

    def project_queries(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.query.forward(tokens)

    def queries(self, projected: torch.Tensor, rope: Optional[torch.Tensor] = None,
                rows: Optional[slice] = None) -> torch.Tensor:
        """Query projections (B, n, h·d) as the attention uses them (norm, RoPE of `rows` of the sequence)."""
        return self._prepared(projected, self.query_norm, rope, rows)

    def keys(self, projected: torch.Tensor, rope: Optional[torch.Tensor] = None,
             rows: Optional[slice] = None) -> torch.Tensor:
        """Key projections as the attention uses them, with grouped key heads repeated to the query heads."""
        return self._prepared(projected, self.key_norm, rope, rows)

    def _prepared(self, projected: torch.Tensor, norm: Optional[torch.nn.Module], rope: Optional[torch.Tensor],
                  rows: Optional[slice]) -> torch.Tensor:
        batch, tokens, width = projected.shape
        heads = width // self.head_dim
        split = projected.reshape(batch, tokens, heads, self.head_dim)
        if norm is not None:
            split = norm(split)
        if rope is not None:
            frequencies = rope if rows is None else rope[:, :, rows]
            split = comfy.ldm.flux.math.apply_rope1(split.transpose(1, 2), frequencies).transpose(1, 2)
        if heads != self.heads:   # grouped-query attention: each key head serves heads/kv_heads query heads
            split = split.repeat_interleave(self.heads // heads, dim=2)
        return split.reshape(batch, tokens, self.heads * self.head_dim)
