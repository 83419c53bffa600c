"""Training personalized residuals inside ComfyUI (the host half of perres_core.training)."""
from __future__ import annotations

import contextlib
import functools
import gc
import logging
from dataclasses import replace
from typing import Callable, Iterator, Optional, Sequence

import torch


from .entry_points import comfy  # the host's modules, imported and checked in one place
from ...perres_core.diffusion import Conditioning
from ...perres_core.errors import PerResError
from ...perres_core.families import ModelFamily
from ...perres_core.grad_checkpoint import outermost_compute_modules, recompute_in_backward
from ...perres_core.memory import is_out_of_memory
from ...perres_core.residual import ResidualSet, family_of
from ...perres_core.preview import PreviewSample
from ...perres_core.training import LatentBucket, PredictFn, TrainSettings, train_residuals
from .model import diffusion_schedule, family_of_model, resident_clone, unet_of
from .differentiable_kernels import differentiable_host_kernels
from .residual_hooks import residual_hooks

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


def caption_conditioning(model, clip, caption: str, width: int, height: int) -> Conditioning:
    """The caption as the denoiser of `model` is conditioned on it, for images of width×height pixels.

    The tokens come from the CLIP (SD1.x: CLIP-L, 77×768; SDXL: CLIP-L and CLIP-G side by side, 77×2048; Anima:
    Qwen3-0.6B with the T5 ids of the prompt; Krea 2: 12 Qwen3-VL-4B layers). Everything else is made by the host
    model's own extra_conds, as when sampling: SDXL's vector y (pooled CLIP-G and the size embeddings of the
    latent's size in pixels), Anima's LLM adapter run over the T5 ids (ComfyUI runs it there when in inference
    mode, as nodes run). A text encoder of another family is refused before the host sees its tokens.
    """
    family = family_of_model(model)
    tokens, extra = clip.encode_from_tokens_scheduled(clip.tokenize(caption))[0]
    require_family_text(family, tokens.shape[-1], extra)
    base = model.model
    device = next(base.diffusion_model.parameters()).device  # where the host runs extra_conds' modules
    conds = base.extra_conds(cross_attn=tokens, **extra, width=width, height=height, crop_w=0, crop_h=0,
                             target_width=width, target_height=height, device=device)
    inputs = {name: cond.cond for name, cond in conds.items()}
    context, vector = inputs.pop("c_crossattn"), inputs.pop("y", None)
    return Conditioning(context, vector, inputs).cpu_float()


def require_family_text(family: ModelFamily, width: int, extra: dict) -> None:
    """Refuse tokens of another family's text encoder (their width tells), naming what to load."""
    missing = [name for name in family.text_encoder_outputs if extra.get(name) is None]
    if width != family.context_width or missing:
        what = f"{width}-wide tokens" + (f" without {', '.join(missing)}" if missing else "")
        raise PerResError(f"the CLIP gives {what}, but {family.name} reads {family.context_width}-wide tokens: the "
                          f"text encoder belongs to another model family. Connect {family.text_encoder}.")


def encode_images(vae, pixels: torch.Tensor, model) -> torch.Tensor:
    """The VAE latents (N, C, h, w) of a batch of still images (N, H, W, 3) for `model`'s denoiser.

    A video VAE (Wan 2.1, which Anima and Krea 2 use) reads a batch as the frames of one clip and packs four
    frames into each latent frame; each image is then encoded as a clip of its own. Latents of another
    family's VAE are refused (image_latents)."""
    if model.model.latent_format.latent_dimensions == 3:
        latents = torch.cat([vae.encode(pixels[i:i + 1]) for i in range(pixels.shape[0])])
    else:
        latents = vae.encode(pixels)
    return image_latents(latents, model)


def image_latents(latents: torch.Tensor, model) -> torch.Tensor:
    """A VAE's latents of still images as (N, C, h, w): a video VAE's single frame (Wan 2.1: (N, C, 1, h, w))
    loses its frame axis. Latents of another family's VAE (other channels) are refused, naming the VAE to load."""
    family, base = family_of_model(model), model.model
    if latents.dim() == 5 and latents.shape[2] == 1:
        latents = latents.squeeze(2)
    channels = base.latent_format.latent_channels
    if latents.dim() != 4 or latents.shape[1] != channels:
        raise PerResError(f"the VAE gives latents of shape {tuple(latents.shape)}, but {family.name} denoises "
                          f"{channels}-channel image latents: the VAE belongs to another model family. Connect "
                          f"{family.vae}.")
    return latents


def model_latents(base, latents: torch.Tensor) -> torch.Tensor:
    """Image latents (N, C, h, w) scaled as the denoiser reads them (the host's process_latent_in), still 4-D; a
    latent format of video models is applied to them as one frame."""
    frames = base.latent_format.latent_dimensions == 3
    scaled = base.process_latent_in(latents.clone().float().unsqueeze(2) if frames else latents.clone().float())
    return scaled.squeeze(2) if frames else scaled


def checkpoint_units(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """What gradient checkpointing wraps: every ResBlock, SpatialTransformer, Down/Upsample and conv.

    The granularity of ComfyUI's TrainLoraNode (the highest non-container children of the UNet). Finer
    units (each transformer's attn1, attn2 and ff) were measured at 512 px and kept no less memory: the
    peak is one block's recomputation and backward, which finer units do not shrink.
    """
    return outermost_compute_modules(unet)


def training_dtype(base) -> torch.dtype:
    """The dtype the UNet computes in: its manual-cast dtype if ComfyUI set one, else its weights' dtype."""
    return base.manual_cast_dtype or base.get_dtype()


def loss_scaler(dtype: torch.dtype, device: torch.device) -> Optional["torch.amp.GradScaler"]:
    """fp16 gradients through the UNet underflow without loss scaling; bf16 and fp32 need none.

    torch's GradScaler exists for CUDA and the CPU alike, so the fp16 path is the same on every device.
    """
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def denoiser_prediction(base) -> PredictFn:
    """The host model's denoiser as f_θ(x_t, t, c): t indexes the schedule's levels, the denoiser receives the
    host's own timestep for that noise level (model_sampling.timestep: t itself on a discrete schedule, σ_t times
    the multiplier on a flow one), the text tokens and the other inputs extra_conds made (SDXL's y). It returns ε̂,
    v̂ or the velocity, as its Schedule says. Models with video-shaped latents get their frame axis back."""
    sampling, frames = base.model_sampling, base.latent_format.latent_dimensions == 3

    def predict(x_t: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        timestep = sampling.timestep(sampling.sigmas[t.to(sampling.sigmas.device)]).float().to(x_t.device)
        output = base.diffusion_model(x_t.unsqueeze(2) if frames else x_t, timestep, context=conditioning.context,
                                      **conditioning.model_inputs())
        return output.squeeze(2) if frames else output
    return predict


# on_step(step, loss, denoise): denoise() is the model's x̂₀ of the run's preview sample (perres_core.preview),
# computed only when called, and only valid during that call.
TrainingStepCallback = Callable[[int, float, Callable[[], torch.Tensor]], None]


def train_on_model(model, buckets: Sequence[LatentBucket], residuals: ResidualSet, settings: TrainSettings,
                   on_step: TrainingStepCallback, gradient_checkpointing: bool = False) -> list[float]:
    """Train `residuals` in place on a frozen copy of `model`; the buckets hold VAE latents (unscaled) with
    their conditioning and optional loss weights (perres_core.training.loss_weights).

    Runs outside inference mode; only the residual parameters get gradients and optimizer state.
    Running out of memory raises OutOfMemoryDuringTraining after everything the run allocated (hooks,
    activations, optimizer state) has been released.
    """
    patcher = resident_clone(model)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            comfy.model_management.load_models_gpu([patcher], force_full_load=True)
            base = patcher.model
            device = patcher.load_device
            dtype = training_dtype(base)
            unet = unet_of(patcher)
            schedule = diffusion_schedule(patcher)
            scaled = [replace(bucket, latents=model_latents(base, bucket.latents).cpu(),
                              conditioning=bucket.conditioning.cpu_float()) for bucket in buckets]
            predict = denoiser_prediction(base)

            @functools.cache  # drawn at the first preview: a run without previews draws no noise for it
            def preview_sample() -> PreviewSample:
                return PreviewSample.of(scaled, schedule, settings.seed)

            def step_done(step: int, loss: float) -> None:
                on_step(step, loss, lambda: preview_sample().denoise(predict, schedule, device, dtype))

            for layer in residuals.layers.values():
                layer.to(device)
                layer.requires_grad_(True)
            units = checkpoint_units(unet) if gradient_checkpointing else []
            try:
                hooks = residual_hooks(unet, residuals.layers)
                with frozen_for_backward(unet), hooks, recompute_in_backward(units), differentiable_host_kernels():
                    return train_residuals(predict, scaled, schedule, residuals.parameters(), settings,
                                           step_done, device=device, dtype=dtype,
                                           grad_scaler=loss_scaler(dtype, device))
            finally:
                for layer in residuals.layers.values():
                    layer.requires_grad_(False)
                    layer.to("cpu")
                    layer.zero_grad(set_to_none=True)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        failure = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        device_name = str(patcher.load_device)
    # Outside the except block: the OOM's traceback, and with it every activation its frames hold, is gone.
    del patcher
    gc.collect()
    comfy.model_management.soft_empty_cache()
    largest = max((bucket.latents for bucket in buckets), key=lambda latents: latents.shape[-2] * latents.shape[-1])
    raise OutOfMemoryDuringTraining(largest, settings.batch_size, gradient_checkpointing, device_name, failure,
                                    family_of(residuals).smaller_resolutions)


class OutOfMemoryDuringTraining(PerResError):
    """Training ran out of memory; the message says what to change in the workflow."""

    def __init__(self, latents: torch.Tensor, batch_size: int, gradient_checkpointing: bool, device: str,
                 failure: str, smaller_resolutions: str = "384 or 256") -> None:
        height, width = latents.shape[-2] * 8, latents.shape[-1] * 8
        resolution = f"{width}" if width == height else f"{width}×{height}"
        advice = ["lower batch_size (1 or 2 still trains; the paper uses 4)",
                  f"lower the resolution (e.g. {smaller_resolutions})"]
        if not gradient_checkpointing:
            advice.insert(0, "turn on gradient_checkpointing (at 512 px it needed a quarter of the memory for "
                             "1.27× the time per step)")
        super().__init__(f"out of memory on {device} while training at {resolution} px with batch_size "
                         f"{batch_size}{' and gradient checkpointing' if gradient_checkpointing else ''}. "
                         f"Nothing was saved and the model is unchanged. To fit: " + "; ".join(advice) +
                         f"; or close other programs that use the {'GPU' if device.startswith('cuda') else 'memory'}. "
                         f"({failure})")
