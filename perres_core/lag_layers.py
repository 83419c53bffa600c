"""Which LAG mask each layer of a denoiser uses (LAG for any LoRA), on UNets and diffusion transformers alike.

LAG computes the mask of block i from that block's text attention to the concept words (paper Eq. 2): a UNet
BasicTransformerBlock's attn2, Anima's cross_attn, Krea 2's joint attn (families.TextAttention). The map is made
at the attention's query projection, from its base output and the concept keys, before any change of that
projection is added. A LoRA also changes layers that run *before* that point in the same call, layers outside
the blocks, and a cross-attention's key/value projections, which act on the prompt's tokens rather than on image
locations. Each gets a role, and the role fixes its mask:

AFTER     the query projection and everything after it in the block (attn2.to_q, to_out, ff, proj_out; Anima's
          cross_attn q/output and MLP; all of Krea 2's attention and MLP): the block's own mask of this call
          (exactly the paper's LAG for proj_out). In a joint sequence (Krea 2) the text tokens take the change in
          full: the LoRA learned its words' representation with it, as the stock loader applies it.
TEXT      a cross-attention's to_k / to_v (UNets, Anima): the host computes the attention with the base keys and
          values; the LoRA's change of the attention output, attn(q, K+ΔK, V+ΔV) − attn(q, K, V), is then added
          inside the block's mask. This is the exact "LoRA inside the mask, base model outside" for these layers
          and costs one extra cross-attention per concept (N×77, small next to self-attention; two when another
          pack replaces cross-attention or overrides the attention, whose output then is not attn(q, K, V)). The
          alternative, ΔK and ΔV only at the trigger words' own token columns (no extra attention), was
          measured (benchmarks/bench_lag_lora.py): it keeps almost nothing of the LoRA's change, because most of
          a LoRA's key/value change sits at the other tokens (start, end, padding, other words).
BEFORE    layers of the block before its text attention module (proj_in, attn1; Anima's self_attn): the same
          block's mask of the previous step, and in the first call of a run, where there is none, this call's
          estimate: the block's own query projection applied to the layer's input (the block's normalized input
          in place of what the text attention will receive) against the concept keys. So no layer of a block runs
          as the base model for want of a mask. Measured (bench_lag_lora.py --part
          policy, random SD1.5, 256 px, 6 steps; docs/benchmarks.md, "Mask policies") against the block's own
          mask of the same step: the previous step's agrees at 89.4 %, this call's estimate at 49.9 % (chance;
          the layer's input is not yet what the text attention receives), the newest mask of another block at
          that resolution at 54.4 %. So the previous step's mask is used wherever it exists, the estimate only
          where the alternative is M = 0 (on SDXL the two are level, 87.2 % and 87.8 %).
SPATIAL   ResBlock convs, skip convs, down/upsamplers, conv_in/conv_out, a DiT's patch embedding and final
          linear: the newest mask at the layer's resolution (this call's if a block at that resolution already
          ran, else the previous step's), or the newest of any resolution, resized. Only layers in front of the
          first text attention (a UNet's first ResBlock, a DiT's patch embedding) keep the base model in the
          first call of a run (M = 0): nothing has attended to the prompt yet.
EMBEDDING ResBlock emb_layers: the timestep embedding's per-channel shift, Δe, is moved to where the block
          adds it to its feature map, h + e + M⊙Δe, so it too is localized; its mask is chosen as for
          SPATIAL layers.
GLOBAL    no image locations at all: time_embed / label_emb, a DiT's timestep modulation, Krea 2's text-fusion
          blocks, Anima's LLM adapter (which runs when the conditioning is prepared, outside the sampling call);
          left to the base model under attention masks (the node warns), scaled like the rest under constant
          masks.

Transformers of several blocks (SDXL: 2 or 10 BasicTransformerBlocks per SpatialTransformer, each with
its own attn2). Every block makes its own mask from its own cross-attention, and the roles above apply per
block. proj_out, after all the blocks, uses the transformer's mask: the median split of the mean of all its
blocks' concept attention maps (Eq. 2 summed over the transformer's cross-attentions). Chosen by experiment
(benchmarks/bench_lag_lora.py --family sdxl --part policy, docs/lag-internals.md; the tests' random-weight
SDXL at 256 px, 6 steps):
  * inside the blocks, one mask per transformer would have to be the previous step's (the transformer's
    mask of this step exists only after its last block); it equals a block's own mask at only 63.5 % of
    locations, and the blocks' own masks cost nothing extra (their maps are computed anyway);
  * for layers before a block's cross-attention, the same block's mask of the previous step agrees with
    the block's own mask at 87.2 % (this call's estimate at 87.8 %); the previous block's mask of this step
    at 49.4 %;
  * for proj_out, the mean of all blocks' maps agrees with the blocks' own masks at 65.8 % against 63.9 %
    for the last block's mask alone, and is about as steady from step to step (87.4 % against 88.2 %).
    A close call on random weights; the mean is Eq. 2 over all of the transformer's cross-attention and
    does not hang on one layer.
A DiT block is one site with its own map, used by its own layers: each block's map is exact and costs a few
image × text logits. Krea 2 has nothing before its joint attention (its query projection makes the map, and the
key, value and gate projections of the same input follow), so there every layer has the map of its own block
and call. Anima's self-attention runs before its cross-attention, and the same experiment decided its mask
(bench_lag_lora.py --family anima --part policy; the random Anima, 256 px, 6 steps, 140 block-steps): the same
block's mask of the previous step agreed with the block's own mask at 95.4 %, this call's estimate at 66.7 %,
the previous block's mask of this step at 48.6 %, a running mean of this step's earlier blocks (split at its
median) at 49.9 %. Neighbouring blocks' maps are no better than chance, so the rule is the UNets' one:
previous step, and the estimate only in the first call.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Mapping, Optional

from .families import ModelFamily, TransformerSlot

Site = tuple[int, Optional[int]]


class Role(Enum):
    AFTER = "after"
    TEXT = "text"
    BEFORE = "before"
    SPATIAL = "spatial"
    EMBEDDING = "embedding"
    GLOBAL = "global"


# sub-paths inside one BasicTransformerBlock (transformer_blocks.<j>.) that run once its cross-attention's map is
# made (at attn2.to_q, before its change is added), or act on the text
_AFTER_IN_BLOCK = ("attn2.to_q", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_TEXT_IN_BLOCK = ("attn2.to_k", "attn2.to_v")
EMBEDDING_MARK = ".emb_layers."
_BLOCKS = "transformer_blocks."


@dataclass(frozen=True)
class Placement:
    """A layer's role and the mask site it reads: a UNet layer's transformer slot and BasicTransformerBlock (block
    None: the whole transformer's mask, for proj_out), a DiT layer's block group and block, or a ResBlock's path
    (EMBEDDING)."""

    role: Role
    slot: Optional[TransformerSlot] = None
    resblock: Optional[str] = None
    block: Optional[int] = None
    group: Optional[int] = None     # DiTs: the index of the layer's block group

    @property
    def site(self) -> Site:
        """(transformer slot or DiT block group, block index or None): the key of the mask this layer uses."""
        return (self.slot.index, self.block) if self.slot is not None else (self.group, self.block)


@dataclass(frozen=True)
class AttentionSite:
    """One block's text attention, where LAG makes a mask: a UNet BasicTransformerBlock's attn2, or the cross- or
    joint attention of a DiT block."""

    site: Site
    block: str                      # the block's path, e.g. "input_blocks.1.1.transformer_blocks.0", "blocks.3"
    slot: Optional[TransformerSlot] = None   # UNets: the transformer whose proj_out uses its blocks' masks
    depth: int = 1                  # blocks in that transformer

    def path(self, family: ModelFamily, part: str = "") -> str:
        """The attention module's path, or of `part` inside it (e.g. "to_q")."""
        module = f"{self.block}.{family.text_attention.module}"
        return f"{module}.{part}" if part else module


def attention_sites(family: ModelFamily, depths: Optional[Mapping[str, int]] = None) -> list[AttentionSite]:
    """Every text attention of a `family` denoiser, in execution order; a DiT's depth per block group from
    `depths` (family.depths(unet_config)), else the released model's."""
    if not family.is_dit:
        return [AttentionSite((slot.index, j), f"{slot.path}.{_BLOCKS}{j}", slot, slot.depth)
                for slot in family.slots for j in range(slot.depth)]
    depths = depths or family.depths()
    return [AttentionSite((g, n), f"{group.prefix}.{n}")
            for g, group in enumerate(family.block_groups) for n in range(depths[group.prefix])]


def placement(path: str, family: ModelFamily) -> Placement:
    """The role of the denoiser layer at `path` (LDM naming on UNets, e.g. 'input_blocks.1.1.proj_in'; the host's
    module paths on DiTs, e.g. 'blocks.3.attn.wq') in a `family` denoiser."""
    if family.is_dit:
        return _dit_placement(path, family)
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
    if path.startswith(family.text_attention.globals):
        return Placement(Role.GLOBAL)
    if EMBEDDING_MARK in path:
        return Placement(Role.EMBEDDING, resblock=path.split(EMBEDDING_MARK)[0])
    return Placement(Role.SPATIAL)


def _dit_placement(path: str, family: ModelFamily) -> Placement:
    attention = family.text_attention
    for g, group in enumerate(family.block_groups):
        if not path.startswith(group.prefix + "."):
            continue
        number, sub = path[len(group.prefix) + 1:].split(".", 1)
        block = int(number)
        if sub.startswith(attention.block_globals):
            return Placement(Role.GLOBAL)
        if sub.startswith(attention.module + "."):
            part = sub[len(attention.module) + 1:]
            text_side = attention.text_tokens == "context" and part in (attention.key, attention.value)
            return Placement(Role.TEXT if text_side else Role.AFTER, block=block, group=g)
        if attention.first_sublayer and sub.startswith(attention.first_sublayer + "."):
            return Placement(Role.BEFORE, block=block, group=g)
        return Placement(Role.AFTER, block=block, group=g)
    if path.startswith(attention.globals):
        return Placement(Role.GLOBAL)
    return Placement(Role.SPATIAL)


def mask_sizes(family: ModelFamily, height: int, width: int) -> list[tuple[int, int]]:
    """The (h, w) grids of image tokens a `family` denoiser's text attention sees for a height×width latent."""
    patch = family.text_attention.patch
    if patch:
        return [(-(-height // patch), -(-width // patch))]
    return level_sizes(height, width)


def level_sizes(height: int, width: int, levels: int = 4) -> list[tuple[int, int]]:
    """Feature-map sizes of the UNet's resolution levels for a latent of height×width (each downsampler is
    a stride-2 conv with padding 1: ⌈h/2⌉)."""
    sizes = [(height, width)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes
