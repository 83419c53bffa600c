"""Training personalized residuals inside ComfyUI (the host half of perres_core.training)."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch

import comfy.model_management

from ..perres_core.residual import ResidualSet
from ..perres_core.training import TrainSettings, train_residuals
from .host_model import unet_of
from .residual_hooks import full_residual, proj_out_hooks

log = logging.getLogger("perres")


@contextlib.contextmanager
def frozen_for_backward(module: torch.nn.Module) -> Iterator[None]:
    """Make a frozen UNet usable in a backward pass that only trains the residuals.

    ComfyUI runs nodes under torch.inference_mode, so weights loaded or patched there are inference
    tensors, which autograd refuses to save. Those are replaced once by ordinary tensors with the same
    values (the change is invisible to every other user of the model). requires_grad is switched off
    for the duration so no gradient is computed for the 860M frozen weights, then restored.
    """
    previous = {}
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if param is None:
                continue
            if param.is_inference():
                param = torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                owner._parameters[name] = param
            previous[param] = param.requires_grad
            param.requires_grad_(False)
        for name, buffer in list(owner._buffers.items()):
            if buffer is not None and buffer.is_inference():
                owner._buffers[name] = buffer.clone()
    try:
        yield
    finally:
        for param, flag in previous.items():
            param.requires_grad_(flag)


def alphas_cumprod(model) -> torch.Tensor:
    """ᾱ_t of the model's discrete schedule, from ComfyUI's σ_t = √((1−ᾱ_t)/ᾱ_t)."""
    sigmas = model.get_model_object("model_sampling").sigmas.float().cpu()
    return 1.0 / (sigmas * sigmas + 1.0)


def train_on_model(model, latents: torch.Tensor, context: torch.Tensor, residuals: ResidualSet,
                   settings: TrainSettings, on_step: Callable[[int, float], None]) -> list[float]:
    """Train `residuals` in place on a frozen copy of `model`; latents are VAE latents (unscaled).

    Runs outside inference mode; only the residual parameters get gradients and optimizer state.
    """
    patcher = model.clone()
    with torch.inference_mode(False), torch.enable_grad():
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        base = patcher.model
        device = patcher.load_device
        dtype = base.manual_cast_dtype or base.get_dtype()
        unet = unet_of(patcher)
        x0 = base.process_latent_in(latents.clone().float()).cpu()
        for layer in residuals.layers.values():
            layer.to(device)
            layer.requires_grad_(True)
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and torch.device(device).type == "cuda" else None

        def predict_noise(x_t: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
            return unet(x_t, t.float(), context=ctx)

        try:
            with frozen_for_backward(unet), proj_out_hooks(unet, full_residual(residuals.layers)):
                return train_residuals(predict_noise, x0, context.clone().float().cpu(), alphas_cumprod(patcher),
                                       residuals.parameters(), settings, on_step, device=device, dtype=dtype,
                                       grad_scaler=scaler)
        finally:
            for layer in residuals.layers.values():
                layer.requires_grad_(False)
                layer.to("cpu")
