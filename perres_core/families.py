"""Model families PerRes personalizes: where their residual layers live and what other tools call them.

A family is data, not code: its SpatialTransformers (each ends in the `proj_out` that carries a
residual, paper Figure 2), the kind and width of those layers, the names ComfyUI, kohya's sd-scripts and
diffusers give them, the resolution the family was trained at and the metadata other tools read. Training,
Apply, the residual files, the suggester and LAG all go through one `ModelFamily`; none has its own copy of
a layout.

The family of a loaded model is chosen from what ComfyUI detected (its unet_config), never from a setting.

Paths are those of the LDM/ComfyUI UNet (`diffusion_model.<path>.weight` in a ComfyUI ModelPatcher).
kohya names differ per family: sd-scripts names SD1.x layers by their diffusers paths and SDXL layers by
their LDM paths (its SDXL UNet keeps the original module names), so an SDXL file reads
`lora_unet_input_blocks_4_1_proj_out` where an SD1.x file reads `lora_unet_down_blocks_0_attentions_0_proj_out`.
ComfyUI's key map accepts both spellings for either family.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from .errors import PerResError


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
class ModelFamily:
    """Everything PerRes needs to know about one family of UNets."""

    name: str                       # stored in residual files ("perres.base_model")
    examples: str                   # for messages, e.g. "SD1.4, SD1.5 and their fine-tunes"
    slots: tuple[TransformerSlot, ...]
    linear_proj_out: bool           # Linear proj_out (use_linear_in_transformer) rather than a 1×1 conv
    # unet_config entries (as ComfyUI's model detection fills them) that identify the family
    signature: Mapping[str, object]
    resolution: int                 # the pixel size the family was trained at, and PerRes' default
    # training below this many px gets a warning on the node (0: never). SD1.x at 256–384 px is a documented
    # way to fit small cards; SDXL at 512 px learns the concept at a size the model rarely draws.
    low_resolution_warning: int
    smaller_resolutions: str        # what the out-of-memory advice suggests, e.g. "384 or 256"
    kohya_base_version: str         # ss_base_model_version, as sd-scripts writes it
    modelspec_architecture: str
    modelspec_implementation: str
    residual_parameters: int        # Σ 2·m_i·r_i at r_i = 0.05·m_i (checked against the slots by the tests)
    slot_by_proj_out: dict[str, TransformerSlot] = field(init=False, repr=False, compare=False)
    slot_by_kohya: dict[str, TransformerSlot] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "slot_by_proj_out", {slot.proj_out: slot for slot in self.slots})
        object.__setattr__(self, "slot_by_kohya", {slot.kohya_prefix: slot for slot in self.slots})

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) features of every proj_out layer, keyed by LDM path."""
        return {slot.proj_out: (slot.channels, slot.channels) for slot in self.slots}

    def matches(self, unet_config: Mapping[str, object]) -> bool:
        return all(unet_config.get(key) == value for key, value in self.signature.items())

    @property
    def context_width(self) -> int:
        """Width of the text context its cross-attention reads (SD1.x: CLIP-L 768; SDXL: CLIP-L + CLIP-G 2048)."""
        return int(self.signature["context_dim"])

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
)

FAMILIES: tuple[ModelFamily, ...] = (SD1, SDXL)
SUPPORTED = "; ".join(family.describe() for family in FAMILIES)


def family_named(name: str) -> ModelFamily:
    """The family a residual file names in its metadata ("SD1.x", "SDXL")."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise PerResError(f"unknown model family '{name}'; this version of PerRes knows "
                      f"{', '.join(f.name for f in FAMILIES)}. Update the pack.")


def family_of_config(unet_config: Mapping[str, object]) -> Optional[ModelFamily]:
    """The family whose signature a detected unet_config carries, or None."""
    return next((family for family in FAMILIES if family.matches(unet_config)), None)


def family_of_context_width(width: int) -> Optional[ModelFamily]:
    """The family whose cross-attention reads text of this width, or None (SD2.x: 1024)."""
    return next((family for family in FAMILIES if family.context_width == width), None)


def family_of_kohya_prefixes(prefixes: set[str]) -> Optional[ModelFamily]:
    """The family all these kohya layer prefixes belong to, or None if no single family has them all."""
    return next((family for family in FAMILIES if prefixes and prefixes <= family.slot_by_kohya.keys()), None)


def require_same_family(residual_family: str, model_family: ModelFamily, what: str = "the residual") -> None:
    """Refuse `what` (trained on `residual_family`) on a model of another family, naming both."""
    if residual_family != model_family.name:
        raise PerResError(f"{what} was trained on an {residual_family} model, but this model is {model_family.name}; "
                          f"residuals only fit the family they were trained on. Load an {residual_family} checkpoint, "
                          f"or use a residual trained on {model_family.name}.")
