"""Build a random-weight Anima diffusion model (the DiT of the released file, at its exact size).

Anima is Cosmos-Predict2 2 B with an LLM adapter (comfy/ldm/anima/model.py over comfy/ldm/cosmos/predict2.py);
users load it with Load Diffusion Model. No real weights can be downloaded in CI, so the tests use a file
whose tensor names and shapes are those the host's own Anima module has, with random values:

- the host's detection (comfy.model_detection) is asked for the config, from the few keys it reads (the
  x_embedder width, the 28 blocks, the LLM adapter), exactly as it reads them from the released file;
- the host builds that model on the meta device, and every tensor of its state dict is written, drawn like
  sd15_checkpoint's, in bf16 (the released dtype), under the released file's `net.` prefix.

So nothing here hard-codes the architecture, and Load Diffusion Model detects the file as Anima. 2.09 G
parameters, about 4.2 GB; written tensor by tensor (sdxl_checkpoint._stream_safetensors), in well under a
minute, and cached beside the SD1.5 and SDXL files.
"""
from __future__ import annotations


import torch

from model_cache import cached_model, linked_model
from sd15_checkpoint import _random_tensor
from sdxl_checkpoint import _stream_safetensors

ANIMA_NAME = "anima_random_arch.safetensors"
ANIMA_BLOCKS = 28
ANIMA_CHANNELS = 2048  # model_channels; detection reads it from x_embedder.proj.1.weight
ANIMA_LATENT_CHANNELS = 16  # Wan 2.1 latents; x_embedder takes (16 + padding mask) × 2×2 patches
PREFIX = "net."


def _detection_keys() -> dict[str, torch.Tensor]:
    """The keys the host's detection reads to tell Anima and its size, as meta tensors."""
    keys = {f"{PREFIX}x_embedder.proj.1.weight": (ANIMA_CHANNELS, (ANIMA_LATENT_CHANNELS + 1) * 4),
            f"{PREFIX}llm_adapter.blocks.0.cross_attn.q_proj.weight": (1, 1)}
    keys.update({f"{PREFIX}blocks.{i}.mlp.layer1.weight": (1, 1) for i in range(ANIMA_BLOCKS)})
    return {name: torch.empty(shape, device="meta") for name, shape in keys.items()}


def anima_meta_tensors() -> dict[str, torch.Tensor]:
    """Every tensor of the host's Anima diffusion model, by the released file's key, on the meta device."""
    import comfy.model_detection
    import comfy.supported_models

    config = comfy.model_detection.model_config_from_unet(_detection_keys(), PREFIX)
    if not isinstance(config, comfy.supported_models.Anima):
        raise RuntimeError(f"the host detects {type(config).__name__}, not Anima, from Anima's keys")
    config.set_inference_dtype(torch.bfloat16, None)
    with torch.device("meta"):
        model = config.get_model({}, device="meta")
    return {PREFIX + name: tensor for name, tensor in model.diffusion_model.state_dict().items()}


def write_anima_model(path: str, seed: int = 0) -> str:
    """Write the random Anima diffusion model (bf16) to `path` and return it."""
    templates = anima_meta_tensors()
    order = sorted(templates)
    specs = {name: (templates[name].shape, torch.bfloat16) for name in order}
    generator = torch.Generator().manual_seed(seed)
    values = ((name, _random_tensor(name, templates[name].shape, generator).to(torch.bfloat16).contiguous())
              for name in order)
    _stream_safetensors(path, specs, values, metadata={"format": "pt"})
    return path


def cached_anima_model() -> str:
    """The random Anima model in the test cache (tests/model_cache.py), built on first use."""
    return cached_model(ANIMA_NAME, write_anima_model, "about 4.2 GB, 20 s")


def link_anima_model(root: str) -> str:
    """Make the cached random Anima model available as `root`/models/diffusion_models/ANIMA_NAME (a symlink)."""
    return linked_model(root, "diffusion_models", ANIMA_NAME, cached_anima_model)
