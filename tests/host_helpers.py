"""Helpers for host tests: training a residual quickly and evaluating the real denoiser."""
from __future__ import annotations

import torch

from conftest import pack, run_node

TRAIN_DEFAULTS = dict(identifier="sks", class_word="dog", steps=2, batch_size=2, learning_rate=1e-3,
                      rank_ratio=0.05, resolution=64, seed=0, init="random")


def train(sd15, images, **overrides):
    """(model, residuals, loss_map) from the PerRes Train Residuals node at 64 px."""
    model, clip, vae = sd15
    return run_node("PerResTrainResiduals", model=model, clip=clip, vae=vae, images=images,
                    **{**TRAIN_DEFAULTS, **overrides})


def denoise(model, x: torch.Tensor, sigma: float, context: torch.Tensor) -> torch.Tensor:
    """The patched model's denoised prediction, loaded and patched by ComfyUI's model management."""
    import comfy.model_management

    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        sigmas = torch.full((x.shape[0],), sigma)
        return model.model.apply_model(x, sigmas, c_crossattn=context).float().cpu()


def sample(model, positive, negative, seed: int = 0, steps: int = 2, batch: int = 1, size: int = 64, cfg: float = 5.0):
    latent = run_node("EmptyLatentImage", width=size, height=size, batch_size=batch)[0]
    return run_node("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                    scheduler="normal", positive=positive, negative=negative, latent_image=latent,
                    denoise=1.0)[0]["samples"]


def encode(clip, text: str):
    return run_node("CLIPTextEncode", clip=clip, text=text)[0]


def proj_out_patch_keys(model) -> set[str]:
    return {key for key in model.patches if key.endswith(".weight")}


def lag_patch_module():
    return pack("nodes.lag_patch")
