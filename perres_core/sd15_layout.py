"""Where the residuals live in an SD1.x UNet, and the names other tools give those layers.

SD1.x has 16 transformer blocks (SpatialTransformer), each ending in a 1×1 conv `proj_out`
(paper Figure 2). Paths are those of the LDM/ComfyUI UNet (`diffusion_model.<path>.weight` in a
ComfyUI ModelPatcher); the kohya names are what ComfyUI's stock LoRA loaders and sd-scripts read.
"""
from __future__ import annotations

from dataclasses import dataclass

INPUT_BLOCKS_WITH_ATTENTION = (1, 2, 4, 5, 7, 8)
OUTPUT_BLOCKS_WITH_ATTENTION = tuple(range(3, 12))
SD15_CHANNELS = {1: 320, 2: 320, 4: 640, 5: 640, 7: 1280, 8: 1280}
SD15_OUTPUT_CHANNELS = {3: 1280, 4: 1280, 5: 1280, 6: 640, 7: 640, 8: 640, 9: 320, 10: 320, 11: 320}
SD15_RESIDUAL_PARAMETERS = 1_239_040  # Σ 2·m_i·r_i with r_i = 0.05·m_i (paper §4.1: "1.2M")


@dataclass(frozen=True)
class TransformerSlot:
    """One of the 16 SpatialTransformers of SD1.x."""

    index: int          # order of execution in the UNet (ComfyUI's transformer_index)
    path: str           # LDM path of the SpatialTransformer, e.g. "input_blocks.1.1"
    block: tuple[str, int]  # ComfyUI's transformer_options["block"], e.g. ("input", 1)
    diffusers: str      # e.g. "down_blocks.0.attentions.0"
    channels: int       # m_i for SD1.5

    @property
    def proj_out(self) -> str:
        return f"{self.path}.proj_out"

    @property
    def kohya_prefix(self) -> str:
        return "lora_unet_" + f"{self.diffusers}.proj_out".replace(".", "_")


def _slots() -> tuple[TransformerSlot, ...]:
    slots = []
    for n in INPUT_BLOCKS_WITH_ATTENTION:
        slots.append((f"input_blocks.{n}.1", ("input", n),
                      f"down_blocks.{(n - 1) // 3}.attentions.{(n - 1) % 3}", SD15_CHANNELS[n]))
    slots.append(("middle_block.1", ("middle", 0), "mid_block.attentions.0", 1280))
    for n in OUTPUT_BLOCKS_WITH_ATTENTION:
        slots.append((f"output_blocks.{n}.1", ("output", n),
                      f"up_blocks.{n // 3}.attentions.{n % 3}", SD15_OUTPUT_CHANNELS[n]))
    return tuple(TransformerSlot(i, *fields) for i, fields in enumerate(slots))


SD15_SLOTS: tuple[TransformerSlot, ...] = _slots()
SLOT_BY_PROJ_OUT = {slot.proj_out: slot for slot in SD15_SLOTS}
SLOT_BY_KOHYA = {slot.kohya_prefix: slot for slot in SD15_SLOTS}


def sd15_layer_shapes() -> dict[str, tuple[int, int]]:
    """(out, in) features of the 16 proj_out layers of SD1.5, keyed by LDM path."""
    return {slot.proj_out: (slot.channels, slot.channels) for slot in SD15_SLOTS}
