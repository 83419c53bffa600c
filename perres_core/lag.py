"""Localized attention-guided (LAG) masks (paper §3.3, Eqs. 2-3).

In transformer block i, A_{i,C} = Σ_{j∈C} softmax(QKᵀ/√d)_j is the attention that every image
location pays to the concept tokens C (identifier and class word), averaged over heads. Binarized at
its median it gives M_i, and the block output becomes f̂_i = W_i·x + M_i·(ΔW_i·x), i.e.
(1−M_i)⊗f_i + M_i⊗f'_i (Eq. 3) with the same bias.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch

from .errors import PerResError

ThresholdMode = Literal["median", "quantile", "soft"]
THRESHOLD_MODES: tuple[str, ...] = ("median", "quantile", "soft")


@dataclass(frozen=True)
class MaskSettings:
    """How an attention map becomes a mask.

    median: the upper half of the map (the paper). quantile: locations above the given quantile.
    soft: the map scaled to [0, 1] by its maximum (no binarization). constant: a fixed mask value,
    for tests and for comparing with global application (1.0) or the base model (0.0).
    """

    mode: ThresholdMode = "median"
    quantile: float = 0.5
    constant: Optional[float] = None

    def validate(self) -> None:
        if self.mode not in THRESHOLD_MODES:
            raise PerResError(f"threshold must be one of {THRESHOLD_MODES}, got {self.mode!r}.")
        if not (0.0 <= self.quantile < 1.0) or math.isnan(self.quantile):
            raise PerResError(f"quantile must be in [0, 1), got {self.quantile}.")


def concept_columns(context_length: int, positions: Sequence[int], prompt_length: int) -> torch.Tensor:
    """Indices (LongTensor) of the concept tokens' columns in a context of `context_length` tokens.

    When ComfyUI batches prompts of different lengths it repeats the shorter context up to the LCM
    length, so column j holds token j mod prompt_length.
    """
    wanted = set(positions)
    return torch.tensor([j for j in range(context_length) if j % prompt_length in wanted], dtype=torch.long)


def concept_attention(q: torch.Tensor, k: torch.Tensor, heads: int, columns: torch.Tensor,
                      padding: int = 0) -> torch.Tensor:
    """A_C of Eq. 2 summed over the selected columns and averaged over heads: (B, N).

    q: (B, N, heads·d) and k: (B, T, heads·d) as produced by the block's own to_q / to_k (heads merged);
    columns: indices of the concept tokens, on q's device. The logits are computed in q's dtype, the model's
    compute dtype, as the attention itself computes them (a bf16 model's fp32 copy of them would cost a
    DiT's LAG a tenth of a step on the CPU); the softmax over all T context tokens is in fp32, and only
    the selected columns are exponentiated. `padding`: zero keys left off after the last of k's (a padded
    context, Anima's): each adds e⁰ to the softmax's denominator.
    """
    batch, tokens, inner = q.shape
    dim_head = inner // heads
    qh = q.reshape(batch, tokens, heads, dim_head).transpose(1, 2)
    kh = k.to(q.dtype).reshape(k.shape[0], k.shape[1], heads, dim_head).transpose(1, 2)
    logits = torch.matmul(qh, kh.transpose(-1, -2)).float() * dim_head ** -0.5   # (B, h, N, T)
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    if padding:
        log_norm = torch.logaddexp(log_norm, torch.full_like(log_norm, math.log(padding)))
    selected = (logits.index_select(-1, columns) - log_norm).exp().sum(dim=-1)  # (B, h, N)
    return selected.mean(dim=1)


def binarize(attention: torch.Tensor, settings: MaskSettings) -> torch.Tensor:
    """Mask (B, N) in [0, 1] from a map (B, N), per sample."""
    if settings.constant is not None:
        return torch.full_like(attention, float(settings.constant))
    if settings.mode == "soft":
        peak = attention.amax(dim=1, keepdim=True).clamp_min(1e-12)
        return (attention / peak).clamp(0.0, 1.0)
    quantile = 0.5 if settings.mode == "median" else settings.quantile
    tokens = attention.shape[1]
    keep = max(1, min(tokens, round(tokens * (1.0 - quantile))))
    # top-k keeps exactly `keep` locations even when values tie (a median split covers half the map)
    index = attention.topk(keep, dim=1).indices
    return torch.zeros_like(attention).scatter_(1, index, 1.0)


def relative_attention(attention: torch.Tensor) -> torch.Tensor:
    """A map (B, N) divided by its own mean over the image: how much more than usual a location is attended.

    Summed attention grows with a concept's number of tokens (Eq. 2 sums over them), so raw maps of two
    concepts are not comparable; relative maps are, and scaling a map leaves its relative map unchanged.
    """
    return attention / attention.mean(dim=1, keepdim=True).clamp_min(1e-12)


def concept_masks(attentions: Sequence[torch.Tensor], settings: MaskSettings) -> list[torch.Tensor]:
    """One mask per concept; where several concepts claim a location it goes to the larger relative attention.

    With one concept this is binarize(A). With several (multi-concept LAG) the masks are disjoint, and a
    concept whose words are more tokens does not win more area for that reason alone.
    """
    masks = [binarize(a, settings) for a in attentions]
    if len(masks) < 2 or settings.constant is not None:
        return masks
    winner = torch.stack([relative_attention(a) for a in attentions]).argmax(dim=0)
    return [mask * (winner == index).to(mask.dtype) for index, mask in enumerate(masks)]
