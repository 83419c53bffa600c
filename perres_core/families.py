"""Model families PerRes personalizes: where their residual layers live and what other tools call them.

A family is data, not code: the layers that carry a residual (path, kind, shape, the LoRA key names ComfyUI's key
map reads), where its text-to-image attention is, how it is recognised from what ComfyUI detected (its
unet_config), its natural resolution, its text encoder and VAE, and the metadata other tools read. Training,
Apply, the residual files, the suggester and LAG all go through one `ModelFamily`; none has its own copy of a
layout. Paths are those of the host's denoiser (`diffusion_model.<path>.weight` in a ComfyUI ModelPatcher).

**UNets (SD1.x, SDXL).** The residual sits on the `proj_out` of each SpatialTransformer (paper Figure 2): the one
layer that maps the whole transformer's inner stream back into the UNet. kohya names differ per family: sd-scripts
names SD1.x layers by their diffusers paths and SDXL layers by their LDM paths, so an SDXL file reads
`lora_unet_input_blocks_4_1_proj_out` where an SD1.x file reads `lora_unet_down_blocks_0_attentions_0_proj_out`.
ComfyUI's key map accepts both spellings for either family. Rank r_i = max(1, round(0.05·m_i)) (§4.1).

**Diffusion transformers (Anima, Krea 2).** A DiT block has no proj_out: it writes into the residual stream at
each of its sub-layers, through the attention output projection(s) and the MLP's last layer (Anima: self-attention
`output_proj`, cross-attention `output_proj`, `mlp.layer2`; Krea 2: `attn.wo`, `mlp.down`). Those writers together
are what proj_out is in a UNet transformer, the maps from the block's inner stream back into the network, so the
residual goes on every one of them, and nowhere else: not on q/k/v (which would change where the model looks, not
what the block adds) and not on the MLP's first layers (4× wider for the same effect). They are plain Linear layers,
so the file stays a LoRA that stock loaders apply (`lora_unet_blocks_3_attn_wo`, from ComfyUI's generic key map).
In Krea 2's single stream these layers also see the text tokens; a LoRA file cannot tell tokens apart, and the
stock loader would apply it to them anyway.

The paper's rank rule would be wrong at DiT scale: r = 0.05·m is 102 at Anima's width and 307 at Krea 2's (6144),
which puts 2–3 % of the model into the residual (≈ 53 M and 300 M parameters) where the paper used 0.14 % of SD1.5
(1,239,040 of 859,520,964). A DiT family's rank instead keeps the paper's share of the frozen denoiser:
r = round(rank_ratio/0.05 · 0.00144 · P / Σ_i (m_i + n_i)) over the released model's layers (P its parameters),
one rank for every layer of the family. rank_ratio keeps its meaning as the residual's size relative to the paper's:
0.05 gives the paper's share (Anima: r = 6, 3.10 M of 2.09 B = 0.148 %; Krea 2: r = 19, 18.5 M of 12.8 B =
0.144 %), 0.1 twice that. A model with fewer blocks than the released one (a test model) gets the released rank.

**Recognition.** The family of a loaded model comes from what ComfyUI detected (its unet_config), never from a
setting; a DiT's depth is read from the same config (the host counts the blocks in the file).

**Files.** Layer names follow ComfyUI's module paths (`lora_unet_` + path with underscores), which ComfyUI's key map
reads for every model. sd-scripts has no modelspec architecture for Anima or Krea 2, so PerRes writes its own:
`anima/lora` and `krea-2/lora`, implementation ComfyUI (the key names are its module paths), and
ss_base_model_version `anima` / `krea2`.

**Adding a family.** Z-Image, Flux.2 Klein and Qwen-Image are each an entry (signature from their unet_config,
block groups, text encoder width, resolution, parameters for the rank rule) plus at most one small adapter:
- Z-Image (ComfyUI `lumina.model.NextDiT`, image_model "lumina2" with its z-image size): one group `layers`,
  writers `attention.out` and `feed_forward.w2`; Qwen3-4B text (2560 wide); single stream with the **image tokens
  first**, so TextAttention.text_tokens "sequence_end".
- Flux.2 Klein (`flux.model.Flux`): two groups: `double_blocks` (writers `img_attn.proj`, `img_mlp.2`, and the
  text stream's `txt_attn.proj`, `txt_mlp.2`) and `single_blocks` (`linear2`, which fuses attention output and
  MLP output into one Linear); Qwen3 text; text first in the joint sequence. The adapter: LAG's queries come
  from the fused `linear1` (qkv and MLP in one Linear), which needs the host's split offsets.
- Qwen-Image (`qwen_image.model`): one group `transformer_blocks`, writers `attn.to_out.0`, `img_mlp.net.2`
  (and the text stream's `attn.to_add_out`, `txt_mlp.net.2`); Qwen2.5-VL text (3584 wide); a dual stream whose
  text keys come from `attn.add_k_proj`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Mapping, Optional

from .errors import PerResError

# The paper's rank rule r = 0.05·m (§4.1) and the share of the frozen model it gives on SD1.5: 1,239,040
# residual parameters of the UNet's 859,520,964. DiT families keep that share (module docstring).
PAPER_RANK_RATIO = 0.05
PAPER_RESIDUAL_SHARE = 1_239_040 / 859_520_964


def rank_for(features: int, ratio: float = PAPER_RANK_RATIO) -> int:
    """Rank r_i = max(1, round(ratio·m_i)) of the residual for a layer with m_i output features (the paper's rule)."""
    check_rank_ratio(ratio)
    return max(1, min(features, round(ratio * features)))


def check_rank_ratio(ratio: float) -> None:
    if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0.0 < ratio <= 1.0:
        raise PerResError(f"rank_ratio must be in (0, 1], got {ratio}. The paper uses 0.05.")


@dataclass(frozen=True)
class TransformerSlot:
    """One SpatialTransformer of a family's UNet."""

    index: int              # order of execution in the UNet (ComfyUI's transformer_index)
    path: str               # LDM path of the SpatialTransformer, e.g. "input_blocks.1.1"
    block: tuple[str, int]  # ComfyUI's transformer_options["block"], e.g. ("input", 1)
    diffusers: str          # e.g. "down_blocks.0.attentions.0"
    channels: int           # m_i: proj_out maps m_i → m_i features
    depth: int              # BasicTransformerBlocks inside (each with its own attn2)
    kohya_prefix: str       # e.g. "lora_unet_down_blocks_0_attentions_0_proj_out"

    @property
    def proj_out(self) -> str:
        return f"{self.path}.proj_out"


@dataclass(frozen=True)
class ResidualLayer:
    """One layer that carries a residual ΔW = A·B."""

    path: str           # module path in the host's denoiser, e.g. "input_blocks.1.1.proj_out", "blocks.3.attn.wo"
    out_features: int   # m
    in_features: int    # n
    conv: bool          # a 1×1 conv (SD1.x's proj_out) rather than a Linear
    lora_name: str      # the key prefix in files, e.g. "lora_unet_blocks_3_attn_wo"
    block: int          # the UNet transformer (slot index) or DiT block it belongs to


@dataclass(frozen=True)
class BlockLayer:
    """A residual layer inside every block of a DiT block group."""

    name: str           # path inside the block, e.g. "attn.wo"
    out_features: int
    in_features: int


@dataclass(frozen=True)
class BlockGroup:
    """The repeated blocks of a DiT: `<prefix>.<n>.<layer>` for n below the loaded model's depth."""

    prefix: str             # e.g. "blocks"
    depth_key: str          # the unet_config entry in which ComfyUI's detection records the number of blocks
    released_depth: int     # blocks of the released model (what the rank rule's layer count refers to)
    layers: tuple[BlockLayer, ...]


@dataclass(frozen=True)
class TextAttention:
    """Where a block's text-to-image attention is, and how its queries and keys become attention logits: what LAG
    reads its concept maps from (perres_core.lag_layers). Paths are inside one block (a UNet's BasicTransformerBlock,
    a DiT block); projections and norms are inside `module`."""

    module: str                     # the attention, e.g. "attn2", "cross_attn", "attn"
    heads: str                      # the module's attribute with its number of query heads
    # "context": keys and values come from a separate text context (cross-attention: UNets, Anima);
    # "sequence_start": text and image run as one sequence, text first (Krea 2)
    text_tokens: Literal["context", "sequence_start"]
    prompt_tokens: str              # the tokenizer output whose ids line up with the text tokens ("l", "t5xxl", ...)
    query: str = "to_q"
    key: str = "to_k"
    value: str = "to_v"
    output: str = "to_out"          # takes the attention's result (LAG adds the text-side change before it)
    query_norm: Optional[str] = None    # per-head norms applied to queries and keys before the logits
    key_norm: Optional[str] = None
    context_argument: Optional[str] = "context"  # the module's forward argument holding the text (cross-attention)
    rope_argument: Optional[str] = None  # the module's forward argument with the rotary embedding of q and k
    first_sublayer: Optional[str] = None  # a sub-module of the block that runs before the text attention
    # sub-paths of a block with no image locations (per-sample modulation), and paths outside the blocks
    block_globals: tuple[str, ...] = ()
    globals: tuple[str, ...] = ()
    padded_to: int = 0              # the denoiser pads the text to this many tokens (Anima: 512)
    patch: int = 0                  # a DiT's image tokens are patch×patch latent pixels


# A UNet BasicTransformerBlock: attn1 (self-attention), then attn2 (cross-attention to the CLIP tokens), then ff.
UNET_ATTENTION = TextAttention("attn2", "heads", "context", "l", first_sublayer="attn1",
                               globals=("time_embed.", "label_emb."))


@dataclass(frozen=True)
class ModelFamily:
    """Everything PerRes needs to know about one family of denoisers (UNets and DiTs alike)."""

    name: str                       # stored in residual files ("perres.base_model")
    examples: str                   # for messages, e.g. "SD1.4, SD1.5 and their fine-tunes"
    # unet_config entries (as ComfyUI's model detection fills them) that identify the family
    signature: Mapping[str, object]
    resolution: int                 # the pixel size the family was trained at, and PerRes' default
    # training below this many px gets a warning on the node (0: never). SD1.x at 256–384 px is a documented
    # way to fit small cards; SDXL at 512 px learns the concept at a size the model rarely draws.
    low_resolution_warning: int
    smaller_resolutions: str        # what the out-of-memory advice suggests, e.g. "384 or 256"
    kohya_base_version: str         # ss_base_model_version, as sd-scripts writes it (or PerRes' own)
    modelspec_architecture: str
    modelspec_implementation: str
    residual_parameters: int        # at rank_ratio 0.05 on the released model (checked by the tests)
    context_width: int              # width of the text encoder's tokens the denoiser is conditioned on
    text_encoder: str               # what to load for it, for messages
    vae: str                        # the VAE whose latents it denoises, for messages
    slots: tuple[TransformerSlot, ...] = ()   # UNets: the SpatialTransformers whose proj_out carry residuals
    linear_proj_out: bool = True    # residual layers are Linear (SDXL, DiTs) rather than 1×1 convs (SD1.x)
    block_groups: tuple[BlockGroup, ...] = ()  # DiTs: the repeated blocks whose writers carry residuals
    denoiser_parameters: int = 0    # DiTs: the released denoiser's parameters (the rank rule keeps their share)
    text_attention: Optional[TextAttention] = None
    # entries the text encoder must give beside the tokens (Anima: the T5 ids its LLM adapter maps onto)
    text_encoder_outputs: tuple[str, ...] = ()
    # parts of LoRA key names that only this family's files carry, in every naming the host reads (DiTs; a UNet
    # LoRA is told by the width of the text its cross-attention reads), to name a LoRA's family in errors
    lora_marks: tuple[str, ...] = ()
    layers: tuple[ResidualLayer, ...] = field(init=False, repr=False, compare=False)
    layer_by_path: dict[str, ResidualLayer] = field(init=False, repr=False, compare=False)
    layer_by_lora: dict[str, ResidualLayer] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        layers = self.residual_layers()
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "layer_by_path", {layer.path: layer for layer in layers})
        object.__setattr__(self, "layer_by_lora", {layer.lora_name: layer for layer in layers})

    @property
    def is_dit(self) -> bool:
        return bool(self.block_groups)

    def depths(self, unet_config: Optional[Mapping[str, object]] = None) -> dict[str, int]:
        """Blocks per DiT block group of the loaded model (its unet_config), or of the released model."""
        config = unet_config or {}
        return {group.prefix: int(config.get(group.depth_key, group.released_depth)) for group in self.block_groups}

    def residual_layers(self, unet_config: Optional[Mapping[str, object]] = None) -> tuple[ResidualLayer, ...]:
        """The layers that carry residuals, in execution order: of the loaded model (a DiT's depth comes from its
        detected unet_config) or, without a config, of the released model."""
        if not self.is_dit:
            return tuple(ResidualLayer(slot.proj_out, slot.channels, slot.channels, not self.linear_proj_out,
                                       slot.kohya_prefix, slot.index) for slot in self.slots)
        depths = self.depths(unet_config)
        return tuple(ResidualLayer(path, layer.out_features, layer.in_features, False,
                                   "lora_unet_" + path.replace(".", "_"), n)
                     for group in self.block_groups for n in range(depths[group.prefix])
                     for layer in group.layers for path in [f"{group.prefix}.{n}.{layer.name}"])

    def rank(self, layer: ResidualLayer, ratio: float = PAPER_RANK_RATIO) -> int:
        """The residual's rank on `layer`: the paper's r = ratio·m on a UNet; on a DiT, the one rank that gives
        ratio/0.05 times the paper's share of the released denoiser (module docstring)."""
        if not self.denoiser_parameters:
            return rank_for(layer.out_features, ratio)
        check_rank_ratio(ratio)
        per_rank = sum(each.out_features + each.in_features for each in self.layers)
        rank = round(ratio / PAPER_RANK_RATIO * PAPER_RESIDUAL_SHARE * self.denoiser_parameters / per_rank)
        return max(1, min(layer.out_features, layer.in_features, rank))

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) features of every residual layer of the released model, keyed by path."""
        return {layer.path: (layer.out_features, layer.in_features) for layer in self.layers}

    def matches(self, unet_config: Mapping[str, object]) -> bool:
        return all(unet_config.get(key) == value for key, value in self.signature.items())

    def describe(self) -> str:
        return f"{self.name} ({self.examples})"


def _slots(input_channels: Mapping[int, int], middle: tuple[int, int], output_channels: Mapping[int, int],
           depths: Mapping[str, int], kohya_names: str) -> tuple[TransformerSlot, ...]:
    """Slots in execution order; `depths` maps "input.N"/"middle"/"output.N" to transformer depth.

    Both families have three ResBlocks per level on the way up and two on the way down (one downsampler
    each), so the diffusers names follow from the LDM block numbers the same way.
    """
    fields = []
    for n, channels in input_channels.items():
        fields.append((f"input_blocks.{n}.1", ("input", n), f"down_blocks.{(n - 1) // 3}.attentions.{(n - 1) % 3}",
                       channels, depths.get(f"input.{n}", 1)))
    fields.append(("middle_block.1", ("middle", 0), "mid_block.attentions.0", middle[0], middle[1]))
    for n, channels in output_channels.items():
        fields.append((f"output_blocks.{n}.1", ("output", n), f"up_blocks.{n // 3}.attentions.{n % 3}", channels,
                       depths.get(f"output.{n}", 1)))
    slots = []
    for index, (path, block, diffusers, channels, depth) in enumerate(fields):
        name = diffusers if kohya_names == "diffusers" else path
        slots.append(TransformerSlot(index, path, block, diffusers, channels, depth,
                                     "lora_unet_" + f"{name}.proj_out".replace(".", "_")))
    return tuple(slots)


SD1 = ModelFamily(
    name="SD1.x",
    examples="SD1.4, SD1.5 and their fine-tunes, including SD1.5 inpainting for sampling",
    slots=_slots({1: 320, 2: 320, 4: 640, 5: 640, 7: 1280, 8: 1280}, (1280, 1),
                 {3: 1280, 4: 1280, 5: 1280, 6: 640, 7: 640, 8: 640, 9: 320, 10: 320, 11: 320}, {}, "diffusers"),
    linear_proj_out=False,
    signature={"context_dim": 768, "model_channels": 320, "use_linear_in_transformer": False,
               "adm_in_channels": None},
    resolution=512,
    low_resolution_warning=0,
    smaller_resolutions="384 or 256",
    kohya_base_version="sd_v1",
    modelspec_architecture="stable-diffusion-v1/lora",
    # what sd-scripts writes for SD1 LoRAs with these diffusers-path key names
    modelspec_implementation="diffusers",
    residual_parameters=1_239_040,  # paper §4.1: "1.2M"
    context_width=768,
    text_attention=UNET_ATTENTION,
    text_encoder="the checkpoint's CLIP-L (Load Checkpoint's CLIP output)",
    vae="the SD VAE (4-channel latents)",
)

SDXL = ModelFamily(
    name="SDXL",
    examples="SDXL 1.0 and its descendants: Pony, Illustrious, NoobAI (ε or v-prediction) and other fine-tunes",
    slots=_slots({4: 640, 5: 640, 7: 1280, 8: 1280}, (1280, 10), {0: 1280, 1: 1280, 2: 1280, 3: 640, 4: 640, 5: 640},
                 {"input.4": 2, "input.5": 2, "input.7": 10, "input.8": 10, "output.0": 10, "output.1": 10,
                  "output.2": 10, "output.3": 2, "output.4": 2, "output.5": 2}, "ldm"),
    linear_proj_out=True,
    signature={"context_dim": 2048, "model_channels": 320, "use_linear_in_transformer": True,
               "adm_in_channels": 2816, "transformer_depth": [0, 0, 2, 2, 10, 10]},
    resolution=1024,
    low_resolution_warning=768,
    smaller_resolutions="896 or 768",
    kohya_base_version="sdxl_base_v1-0",
    modelspec_architecture="stable-diffusion-xl-v1-base/lora",
    # sd-scripts' value for SDXL files, whose keys follow Stability AI's original module names
    modelspec_implementation="https://github.com/Stability-AI/generative-models",
    residual_parameters=1_187_840,
    context_width=2048,
    text_attention=UNET_ATTENTION,
    text_encoder="the checkpoint's CLIP-L and CLIP-G (Load Checkpoint's CLIP output)",
    vae="the SDXL VAE (4-channel latents)",
)


# DiTs: widths and depths are those ComfyUI 0.33.0 builds for the released files (comfy/ldm/cosmos/predict2.py,
# comfy/ldm/krea2/model.py); the parameter counts are of those modules.
ANIMA = ModelFamily(
    name="Anima",
    examples="the Cosmos-Predict2 2 B DiT with the Qwen3-0.6B LLM adapter, and its fine-tunes",
    signature={"image_model": "anima", "model_channels": 2048},
    resolution=1024,
    low_resolution_warning=768,
    smaller_resolutions="768 or 512",
    kohya_base_version="anima",
    modelspec_architecture="anima/lora",
    modelspec_implementation="https://github.com/comfyanonymous/ComfyUI",
    residual_parameters=3_096_576,  # r = 6 on 84 layers: 0.148 % of 2,091,068,928
    context_width=1024,
    text_encoder="Anima's Qwen3-0.6B text encoder (Load CLIP)",
    vae="the Wan 2.1 VAE (16-channel latents)",
    block_groups=(BlockGroup("blocks", "num_blocks", 28, (
        BlockLayer("self_attn.output_proj", 2048, 2048),
        BlockLayer("cross_attn.output_proj", 2048, 2048),
        BlockLayer("mlp.layer2", 2048, 8192))),),
    denoiser_parameters=2_091_068_928,
    # self-attention, then cross-attention to the LLM adapter's output (one token per T5 token, zero-padded to 512)
    text_attention=TextAttention("cross_attn", "n_heads", "context", "t5xxl", "q_proj", "k_proj", "v_proj",
                                 "output_proj", "q_norm", "k_norm", context_argument="context",
                                 first_sublayer="self_attn", block_globals=("adaln_modulation_",),
                                 globals=("t_embedder.", "t_embedding_norm", "final_layer.adaln_modulation",
                                          "llm_adapter."), padded_to=512, patch=2),
    text_encoder_outputs=("t5xxl_ids",),
    lora_marks=("cross_attn", "self_attn", "llm_adapter"),
)

KREA2 = ModelFamily(
    name="Krea 2",
    examples="RAW and Turbo, the 12 B single-stream DiT, and their fine-tunes",
    signature={"image_model": "krea2", "features": 6144},
    resolution=1024,
    low_resolution_warning=768,
    smaller_resolutions="768 or 512",
    kohya_base_version="krea2",
    modelspec_architecture="krea-2/lora",
    modelspec_implementation="https://github.com/comfyanonymous/ComfyUI",
    residual_parameters=18_522_112,  # r = 19 on 56 layers: 0.144 % of 12,820,073,036
    context_width=12 * 2560,  # the 12 tapped Qwen3-VL-4B layers, side by side
    text_encoder="Krea 2's Qwen3-VL-4B text encoder (Load CLIP, type krea2)",
    vae="the Wan 2.1 VAE (16-channel latents)",
    block_groups=(BlockGroup("blocks", "layers", 28, (
        BlockLayer("attn.wo", 6144, 6144),
        BlockLayer("mlp.down", 6144, 16384))),),
    denoiser_parameters=12_820_073_036,
    # module paths (kohya: lora_unet_blocks_3_attn_wq) and diffusers names (comfy.utils.krea2_to_diffusers)
    lora_marks=("attn_wq", "attn.wq", "attn_wo", "attn.wo", "to_gate", "txtfusion", "ff.gate", "ff.down", "mlp_down",
                "mlp.down"),
    # one joint attention over [text, image] tokens; q and k get per-head RMS norms, then RoPE
    text_attention=TextAttention("attn", "heads", "sequence_start", "qwen3vl_4b", "wq", "wk", "wv", "wo",
                                 "qknorm.qnorm", "qknorm.knorm", context_argument=None, rope_argument="freqs",
                                 block_globals=("mod",), globals=("tmlp.", "tproj.", "txtfusion.", "txtmlp.",
                                                                  "last.modulation"), patch=2),
)

FAMILIES: tuple[ModelFamily, ...] = (SD1, SDXL, ANIMA, KREA2)
SUPPORTED = "; ".join(family.describe() for family in FAMILIES)


def family_named(name: str) -> ModelFamily:
    """The family a residual file names in its metadata ("SD1.x", "SDXL", "Anima", "Krea 2")."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise PerResError(f"unknown model family '{name}'; this version of PerRes knows "
                      f"{', '.join(f.name for f in FAMILIES)}. Update the pack.")


def family_of_config(unet_config: Mapping[str, object]) -> Optional[ModelFamily]:
    """The family whose signature a detected unet_config carries, or None."""
    return next((family for family in FAMILIES if family.matches(unet_config)), None)


def family_of_context_width(width: int) -> Optional[ModelFamily]:
    """The UNet family whose cross-attention (attn2) reads text of this width, or None (SD2.x: 1024)."""
    return next((family for family in FAMILIES if not family.is_dit and family.context_width == width), None)


def family_of_lora_keys(keys) -> Optional[ModelFamily]:
    """The DiT family whose LoRA key names these are (ModelFamily.lora_marks), or None."""
    return next((family for family in FAMILIES for key in keys if family.lora_marks
                 and any(mark in key for mark in family.lora_marks)), None)


def family_of_kohya_prefixes(prefixes: set[str]) -> Optional[ModelFamily]:
    """The family all these layer key prefixes belong to, or None if no single family has them all."""
    return next((family for family in FAMILIES if prefixes and prefixes <= family.layer_by_lora.keys()), None)


def require_same_family(residual_family: str, model_family: ModelFamily, what: str = "the residual") -> None:
    """Refuse `what` (trained on `residual_family`) on a model of another family, naming both."""
    if residual_family != model_family.name:
        raise PerResError(f"{what} was trained on {a_model(residual_family)}, but this model is {model_family.name}; "
                          "residuals only fit the family they were trained on. "
                          f"Load {a_model(residual_family, 'checkpoint')}, or use a residual trained on "
                          f"{model_family.name}.")


def a_model(family_name: str, noun: str = "model") -> str:
    """'an SD1.x model', 'an Anima model', 'a Krea 2 checkpoint' (for messages)."""
    return f"{'an' if family_name[:1] in 'AEIOS' else 'a'} {family_name} {noun}"
