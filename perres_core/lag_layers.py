"""Which LAG mask each layer of a UNet uses (LAG for any LoRA).

LAG computes the mask of transformer block i from that block's cross-attention to the concept words
(paper Eq. 2). A LoRA also changes layers that run *before* that cross-attention in the same UNet call,
layers outside the transformer blocks, and the cross-attention's key/value projections, which act on the
prompt's tokens rather than on image locations. Each gets a role, and the role fixes its mask:

AFTER     proj_out, attn2.to_out, ff: the block's own mask of this step (exactly the paper's LAG).
TEXT      attn2.to_k / to_v: the host computes the cross-attention with the base keys and values; the
          LoRA's change of the attention output, attn(q, K+ΔK, V+ΔV) − attn(q, K, V), is then added inside
          the block's mask. This is the exact "LoRA inside the mask, base model outside" for these layers
          and costs one extra cross-attention per concept (N×77, small next to self-attention; two when
          another pack replaces cross-attention, whose output then is not attn(q, K, V)). The alternative,
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

Transformers of several blocks (SDXL: 2 or 10 BasicTransformerBlocks per SpatialTransformer, each with
its own attn2). Every block makes its own mask from its own cross-attention, and the roles above apply per
block: a block's attn2.to_out and ff use that block's mask, its attn2.to_k/to_v the same, its attn1 and
attn2.to_q that block's mask of the previous step. proj_out, after all the blocks, uses the transformer's
mask: the median split of the mean of all its blocks' concept attention maps (Eq. 2 summed over the
transformer's cross-attentions). Chosen by experiment (benchmarks/bench_lag_lora.py --family sdxl --part
policy, README "LAG for any LoRA"; the tests' random-weight SDXL at 256 px, 6 steps):
  * inside the blocks, one mask per transformer would have to be the previous step's (the transformer's
    mask of this step exists only after its last block); it equals a block's own mask at only 63.5 % of
    locations, and the blocks' own masks cost nothing extra (their maps are computed anyway);
  * for layers before a block's cross-attention, the same block's mask of the previous step agrees with
    the block's own mask at 84.5 %; the previous block's mask of this step at 49.4 %;
  * for proj_out, the mean of all blocks' maps agrees with the blocks' own masks at 65.8 % against 63.9 %
    for the last block's mask alone, and is about as steady from step to step (87.4 % against 88.2 %).
    A close call on random weights; the mean is Eq. 2 over all of the transformer's cross-attention and
    does not hang on one layer.
With one block per transformer (SD1.x) all of this is the single-block rule above.
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


# sub-paths inside one BasicTransformerBlock (transformer_blocks.<j>.) that run after its cross-attention,
# or act on the text
_AFTER_IN_BLOCK = ("attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_TEXT_IN_BLOCK = ("attn2.to_k", "attn2.to_v")
_GLOBAL_PREFIXES = ("time_embed.", "label_emb.")
EMBEDDING_MARK = ".emb_layers."
_BLOCKS = "transformer_blocks."


@dataclass(frozen=True)
class Placement:
    """A layer's role; its transformer slot and BasicTransformerBlock (block None: the whole transformer's
    mask, for proj_out) inside a SpatialTransformer, or its ResBlock's path (EMBEDDING)."""

    role: Role
    slot: Optional[TransformerSlot] = None
    resblock: Optional[str] = None
    block: Optional[int] = None

    @property
    def site(self) -> tuple[int, Optional[int]]:
        """(transformer slot index, block index or None): the key of the mask this layer uses."""
        return (self.slot.index, self.block)


def placement(path: str, family: ModelFamily) -> Placement:
    """The role of the UNet layer at `path` (LDM naming, e.g. 'input_blocks.1.1.proj_in') in a `family` UNet."""
    for slot in family.slots:
        if path.startswith(slot.path + "."):
            sub = path[len(slot.path) + 1:]
            if sub == "proj_out":
                return Placement(Role.AFTER, slot)
            if not sub.startswith(_BLOCKS):   # proj_in, norm: before block 0's cross-attention
                return Placement(Role.BEFORE, slot, block=0)
            index, rest = sub[len(_BLOCKS):].split(".", 1)
            role = Role.AFTER if rest in _AFTER_IN_BLOCK else Role.TEXT if rest in _TEXT_IN_BLOCK else Role.BEFORE
            return Placement(role, slot, block=int(index))
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
