"""Which LAG mask each layer of a UNet uses (LAG for any LoRA).

LAG computes the mask of transformer block i from that block's cross-attention to the concept words
(paper Eq. 2). A LoRA also changes layers that run *before* that cross-attention in the same UNet call,
layers outside the transformer blocks, and the cross-attention's key/value projections, which act on the
prompt's tokens rather than on image locations. Each gets a role, and the role fixes its mask:

AFTER     proj_out, attn2.to_out, ff: the block's own mask of this step (exactly the paper's LAG).
TEXT      attn2.to_k / to_v: the host computes the cross-attention with the base keys and values; the
          LoRA's change of the attention output, attn(q, K+ΔK, V+ΔV) − attn(q, K, V), is then added inside
          the block's mask. This is the exact "LoRA inside the mask, base model outside" for these layers
          and costs two extra cross-attentions (N×77, small next to self-attention). The alternative,
          ΔK and ΔV only at the trigger words' own token columns (no extra attention), was measured
          (benchmarks/bench_lag_lora.py): it keeps almost nothing of the LoRA's change, because most of
          a LoRA's key/value change sits at the other tokens (start, end, padding, other words).
BEFORE    proj_in, attn1, attn2.to_q: run before the block's cross-attention. They use the same block's
          mask of the previous step. Measured against the block's own mask of the same step, it agrees
          far more often than the newest mask of another block at that resolution. At the first step
          they take the newest mask at their resolution from this call, as SPATIAL layers do.
SPATIAL   ResBlock convs, skip convs, down/upsamplers, conv_in/conv_out: the newest mask at the layer's
          resolution (this call's if a block at that resolution already ran, else the previous step's),
          or the newest of any resolution, resized.
EMBEDDING ResBlock emb_layers: the timestep embedding's per-channel shift, Δe, is moved to where the block
          adds it to its feature map, h + e + M⊙Δe, so it too is localized; its mask is chosen as for
          SPATIAL layers.
GLOBAL    time_embed / label_emb: no image locations at all; left to the base model under attention
          masks (the node warns), scaled like the rest under constant masks.

Before the first mask of a sampling run exists (the first layers of the first step), masked layers keep
the base model: M = 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

from .families import ModelFamily, TransformerSlot


class Role(Enum):
    AFTER = "after"
    TEXT = "text"
    BEFORE = "before"
    SPATIAL = "spatial"
    EMBEDDING = "embedding"
    GLOBAL = "global"


# sub-paths inside a SpatialTransformer that run after its cross-attention, or act on the text
_AFTER = ("proj_out", "transformer_blocks.0.attn2.to_out.0", "transformer_blocks.0.ff.net.0.proj",
          "transformer_blocks.0.ff.net.2")
_TEXT = ("transformer_blocks.0.attn2.to_k", "transformer_blocks.0.attn2.to_v")
_GLOBAL_PREFIXES = ("time_embed.", "label_emb.")
EMBEDDING_MARK = ".emb_layers."


@dataclass(frozen=True)
class Placement:
    """A layer's role; its transformer slot (inside a block) or its ResBlock's path (EMBEDDING)."""

    role: Role
    slot: Optional[TransformerSlot] = None
    resblock: Optional[str] = None


def placement(path: str, family: ModelFamily) -> Placement:
    """The role of the UNet layer at `path` (LDM naming, e.g. 'input_blocks.1.1.proj_in') in a `family` UNet."""
    for slot in family.slots:
        if path.startswith(slot.path + "."):
            sub = path[len(slot.path) + 1:]
            role = Role.AFTER if sub in _AFTER else Role.TEXT if sub in _TEXT else Role.BEFORE
            return Placement(role, slot)
    if path.startswith(_GLOBAL_PREFIXES):
        return Placement(Role.GLOBAL)
    if EMBEDDING_MARK in path:
        return Placement(Role.EMBEDDING, resblock=path.split(EMBEDDING_MARK)[0])
    return Placement(Role.SPATIAL)


def level_sizes(height: int, width: int, levels: int = 4) -> list[tuple[int, int]]:
    """Feature-map sizes of the UNet's resolution levels for a latent of height×width (each downsampler is
    a stride-2 conv with padding 1: ⌈h/2⌉)."""
    sizes = [(height, width)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes
