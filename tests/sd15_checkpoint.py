"""Build a random-weight checkpoint with the exact SD1.5 architecture.

No real Stable Diffusion weights can be downloaded in CI, so the host tests use a checkpoint whose
tensor names and shapes are those of SD1.5 (UNet, CLIP-L text encoder, KL VAE) and whose values are
random. ComfyUI's own model detection then treats it as SD15, and every code path that a user's
checkpoint takes (loading, weight patching, sampling) is exercised for real.

Shapes come from ComfyUI's own module definitions built on the meta device, so nothing here
hard-codes the architecture.
"""
from __future__ import annotations

import math

import torch
from safetensors.torch import save_file

from model_cache import cached_model, linked_model

CHECKPOINT_NAME = "sd15_random_arch.safetensors"

SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SD15_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}


def _meta_shapes() -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Tensor names (checkpoint layout) and shapes of SD1.5, taken from ComfyUI's modules."""
    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}
    with torch.device("meta"):
        unet = UNetModel(**SD15_UNET_CONFIG, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
        clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float32)
        vae = AutoencoderKL(ddconfig=SD15_VAE_DDCONFIG, embed_dim=4)
    parts = (("model.diffusion_model.", unet), ("cond_stage_model.", clip), ("first_stage_model.", vae))
    for prefix, module in parts:
        for name, tensor in module.state_dict().items():
            if name.endswith("logit_scale") or "text_projection" in name:
                continue  # SD1.5 checkpoints do not carry these
            shapes[prefix + name] = (tensor.shape, tensor.dtype)
    return shapes


def _random_tensor(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 0:
        return torch.zeros(shape)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias" or "position_ids" in name:
        return torch.zeros(shape)
    if len(shape) == 1:  # norm scales
        return torch.ones(shape)
    if "embedding" in name:
        return torch.randn(shape, generator=generator) * 0.02
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def write_sd15_checkpoint(path: str, seed: int = 0) -> str:
    """Write the random SD1.5-architecture checkpoint (fp16) to `path` and return it."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, (shape, dtype) in _meta_shapes().items():
        tensor = _random_tensor(name, shape, generator)
        state[name] = tensor.to(torch.float16) if dtype.is_floating_point else tensor.to(dtype)
    save_file(state, path)
    return path


def cached_sd15_checkpoint() -> str:
    """The random checkpoint in the test cache (tests/model_cache.py), built on first use."""
    return cached_model(CHECKPOINT_NAME, write_sd15_checkpoint, "about 30 s")


def link_sd15_checkpoint(root: str, name: str = CHECKPOINT_NAME) -> str:
    """Make the cached random checkpoint available as `root`/models/checkpoints/`name` (a symlink)."""
    return linked_model(root, "checkpoints", name, cached_sd15_checkpoint)
