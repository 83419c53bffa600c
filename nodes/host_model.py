"""What the pack needs to know about a ComfyUI MODEL: is it SD1.x, and where are its proj_out layers."""
from __future__ import annotations

import torch

import comfy.lora

from ..perres_core.errors import PerResError
from ..perres_core.residual import ResidualSet
from ..perres_core.residual_file import residuals_to_state_dict
from ..perres_core.sd15_layout import SD15_SLOTS, TransformerSlot

SUPPORTED = "SD1.x models (SD1.4, SD1.5 and their fine-tunes, including SD1.5 inpainting for sampling)"


def model_family(model) -> str:
    return type(model.model.model_config).__name__


def unet_of(model) -> torch.nn.Module:
    return model.model.diffusion_model


def require_sd1(model) -> None:
    """Raise a PerResError unless `model` is an SD1.x UNet with the 16 1×1-conv proj_out layers."""
    config = getattr(model.model, "model_config", None)
    unet_config = getattr(config, "unet_config", {}) or {}
    family = model_family(model) if config is not None else type(model.model).__name__
    is_sd1 = (unet_config.get("context_dim") == 768 and unet_config.get("model_channels") == 320
              and not unet_config.get("use_linear_in_transformer", True)
              and unet_config.get("adm_in_channels") is None)
    if not is_sd1:
        linear = " (its proj_out layers are Linear, not 1×1 convs)" if unet_config.get("use_linear_in_transformer") else ""
        raise PerResError(f"the model is {family}{linear}; PerRes supports {SUPPORTED}. "
                          "Load an SD1.x checkpoint with 'Load Checkpoint'.")
    unet = unet_of(model)
    for slot in SD15_SLOTS:
        conv = _find(unet, slot.proj_out)
        if not isinstance(conv, torch.nn.Conv2d) or tuple(conv.weight.shape) != (slot.channels, slot.channels, 1, 1):
            raise PerResError(f"the model ({family}) has no {slot.channels}-channel 1×1 proj_out at {slot.proj_out}; "
                              f"PerRes supports {SUPPORTED}.")


def require_trainable(model) -> None:
    """Training needs a plain ε-prediction SD1.x UNet with 4 latent input channels."""
    require_sd1(model)
    in_channels = model.model.model_config.unet_config.get("in_channels", 4)
    if in_channels != 4:
        raise PerResError(f"the model has {in_channels} input channels (an inpainting or instruct model). Train on the "
                          "regular SD1.5 checkpoint; the residual then also applies to the inpainting model.")
    model_type = getattr(model.model, "model_type", None)
    if getattr(model_type, "name", "EPS") != "EPS":
        raise PerResError(f"the model predicts {model_type.name}, but PerRes trains with the ε-prediction loss "
                          "(paper Eq. 1); use an ε-prediction SD1.x checkpoint.")


def resident_clone(model):
    """A clone of `model` whose weights stay on the device for a whole training step.

    Current ComfyUI loads models on NVIDIA GPUs through ModelPatcherDynamic (comfy-aimdo): weights live in
    system memory and are streamed to the GPU per operation, reusing their buffers, so a backward pass
    could read weights that were already overwritten. Those hosts offer clone(disable_dynamic=True), which
    reloads the model through its loader as an ordinary ModelPatcher; older hosts have no dynamic loading
    and a plain clone is already resident. Patches and object patches of `model` carry over either way.
    """
    is_dynamic = getattr(model, "is_dynamic", None)
    if is_dynamic is None or not is_dynamic():
        return model.clone()
    if getattr(model, "cached_patcher_init", None) is None:  # the host reloads through it; without: RuntimeError
        raise PerResError("this model is loaded with dynamic VRAM by a loader that cannot reload it fully into "
                          "memory, which training needs. Load it with 'Load Checkpoint', or start ComfyUI with "
                          "--disable-dynamic-vram.")
    return model.clone(disable_dynamic=True)


def _find(root: torch.nn.Module, path: str):
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def transformer_modules(unet: torch.nn.Module) -> list[tuple[TransformerSlot, torch.nn.Module]]:
    """The 16 SpatialTransformers in execution order."""
    return [(slot, unet.get_submodule(slot.path)) for slot in SD15_SLOTS]


def with_residual_weights(model, residuals: ResidualSet, strength: float):
    """A clone of `model` whose proj_out weights become W + strength·ΔW when ComfyUI loads it.

    This goes through ComfyUI's own LoRA key map and weight adapter, so it is the same arithmetic as
    loading the saved file with the stock LoraLoaderModelOnly (and costs nothing while sampling).
    """
    patched = model.clone()
    if strength == 0:
        return patched
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(residuals_to_state_dict(residuals), key_map, log_missing=True)
    if len(patches) != len(residuals.layers):
        raise PerResError(f"only {len(patches)} of {len(residuals.layers)} residual layers match this model.")
    patched.add_patches(patches, strength)
    return patched
