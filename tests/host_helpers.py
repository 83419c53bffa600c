"""Helpers for host tests: training a residual quickly and evaluating the real denoiser."""
from __future__ import annotations

import torch

from conftest import pack, run_node

TRAIN_DEFAULTS = dict(identifier="sks", class_word="dog", steps=2, batch_size=2, learning_rate=1e-3,
                      rank_ratio=0.05, resolution=64, seed=0, init="random")


def train(sd15, images, **overrides):
    """(model, residuals, loss_map) from the PerRes Train Residuals node at 64 px (its snapshots output, the
    fourth, is left out: tests of snapshots call the node themselves)."""
    model, clip, vae = sd15
    return run_node("PerResTrainResiduals", model=model, clip=clip, vae=vae, images=images,
                    **{**TRAIN_DEFAULTS, **overrides})[:3]


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


def held_out_loss(model, clip, vae, images: torch.Tensor, residuals, dtype: torch.dtype = torch.float32,
                  weights: torch.Tensor | None = None) -> float:
    """ε-MSE of the model with `residuals` on the images at fixed timesteps (150/450/750) and noise that
    training never draws (seed 12345), with the UNet computing in `dtype`; weighted per latent location by
    `weights` (N, 1, h, w) if given, as masked training weights it."""
    training = pack("perres_core.training")
    hooks = pack("nodes.host.residual_hooks")
    host = pack("nodes.host.training")
    with torch.inference_mode():
        latents = model.model.process_latent_in(vae.encode(images)).clone()
        context = encode(clip, "a photo of a sks dog")[0][0].clone()
    unet = model.model.diffusion_model
    with torch.no_grad(), hooks.residual_hooks(unet, residuals.layers):
        return training.evaluation_loss(host.denoiser_prediction(model.model), latents, context,
                                        pack("nodes.host.model").diffusion_schedule(model),
                                        torch.tensor([150, 450, 750]), seed=12345,
                                        dtype=dtype, weights=weights)


def factors(residuals) -> dict[str, torch.Tensor]:
    """Every residual factor by name ('<layer>.up', '<layer>.down'), detached copies."""
    return {f"{path}.{name}": p.detach().clone() for path, layer in residuals.layers.items()
            for name, p in layer.named_parameters()}


def layers_equal(a, b) -> bool:
    return all(torch.equal(a.layers[k].up, b.layers[k].up) and torch.equal(a.layers[k].down, b.layers[k].down)
               for k in a.layers)


def untrained_residuals(seed: int):
    """The residual a training run with `seed` starts from (random init, paper rank)."""
    residual_mod = pack("perres_core.residual")
    residuals = residual_mod.ResidualSet.for_family(pack("perres_core.families").SD1)
    with torch.inference_mode(False):
        residuals.initialize("random", seed)
    return residuals


def proj_out_patch_keys(model) -> set[str]:
    return {key for key in model.patches if key.endswith(".weight")}


def lag_patch_module():
    return pack("nodes.host.lag_patch")
