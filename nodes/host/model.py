"""What the pack needs to know about a ComfyUI MODEL: its family (perres_core.families), where its residual
layers are, and what its denoiser predicts."""
from __future__ import annotations

import torch


from .entry_points import comfy  # the host's modules, imported and checked in one place
from ...perres_core.diffusion import Schedule
from ...perres_core.errors import PerResError
from ...perres_core.families import SUPPORTED, ModelFamily, TransformerSlot, family_of_config, \
    require_same_family
from ...perres_core.residual import ResidualSet
from ...perres_core.residual_file import residuals_to_state_dict

def config_name(model) -> str:
    """The class name of the host's detected model config (e.g. 'SD15', 'SDXL', 'Flux')."""
    config = getattr(model.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model.model).__name__


def unet_of(model) -> torch.nn.Module:
    return model.model.diffusion_model


def family_of_model(model) -> ModelFamily:
    """The family of a ComfyUI MODEL, from its detected unet_config, checked against its real residual layers.

    Raises a PerResError naming what is supported when the model is of another family.
    """
    config = getattr(model.model, "model_config", None)
    unet_config = getattr(config, "unet_config", {}) or {}
    detected = config_name(model)
    family = family_of_config(unet_config)
    if family is None:
        linear = unet_config.get("use_linear_in_transformer")
        sd2 = linear and unet_config.get("context_dim") == 1024
        hint = " (its proj_out layers are Linear, not 1×1 convs)" if sd2 else ""
        raise PerResError(f"the model is {detected}{hint}; PerRes supports {SUPPORTED}. Load a checkpoint of one "
                          "of these families ('Load Checkpoint'; 'Load Diffusion Model' for Anima and Krea 2).")
    denoiser = unet_of(model)
    for layer in family.residual_layers(unet_config):
        module = _find(denoiser, layer.path)
        kind = torch.nn.Conv2d if layer.conv else torch.nn.Linear
        shape = (layer.out_features, layer.in_features) + ((1, 1) if layer.conv else ())
        if not isinstance(module, kind) or tuple(module.weight.shape) != shape:
            raise PerResError(f"the model ({detected}) looks like {family.name} but has no {layer.out_features}×"
                              f"{layer.in_features} {kind.__name__} at {layer.path}; PerRes supports {SUPPORTED}.")
    return family


def unet_config_of(model) -> dict:
    """What ComfyUI detected about the model's denoiser (a DiT's depth among it)."""
    return dict(getattr(model.model.model_config, "unet_config", {}) or {})


def require_fits(model, residuals: ResidualSet, what: str = "the residual") -> ModelFamily:
    """The model's family, after refusing residuals trained on another family (the message names both)."""
    family = family_of_model(model)
    require_same_family(residuals.base_model, family, what)
    return family


def diffusion_schedule(model) -> Schedule:
    """The noise levels and the prediction type of the model's schedule, from the host's model_sampling.

    A discrete (DDPM) schedule: ComfyUI's σ_t = √((1−ᾱ_t)/ᾱ_t) gives ᾱ_t = 1/(σ_t²+1), zero-terminal-SNR rescaling
    included; what the UNet predicts is read from how model_sampling turns its output into x̂0 (ε or v). A
    rectified-flow schedule (CONST: the DiTs' ModelSamplingDiscreteFlow and ModelSamplingFlux) keeps its σ_t table,
    shift applied, and the denoiser predicts the velocity. Anything else (EDM, x0, LCM) is refused with what to
    load instead.
    """
    sampling = model.get_model_object("model_sampling")
    samplers = comfy.model_sampling
    denoise = type(sampling).calculate_denoised
    discrete = isinstance(sampling, samplers.ModelSamplingDiscrete) and \
        type(sampling).calculate_input is samplers.EPS.calculate_input
    flow = isinstance(sampling, (samplers.ModelSamplingDiscreteFlow, samplers.ModelSamplingFlux)) and \
        denoise is samplers.CONST.calculate_denoised and type(sampling).noise_scaling is samplers.CONST.noise_scaling
    sigmas = sampling.sigmas.float().cpu()
    if flow:
        return Schedule(sigmas, "flow")
    if discrete and denoise is samplers.V_PREDICTION.calculate_denoised:
        prediction = "v"
    elif discrete and denoise is samplers.EPS.calculate_denoised:
        prediction = "epsilon"
    else:
        kind = type(sampling).__name__ + "/" + next((base.__name__ for base in type(sampling).__mro__
                                                      if "calculate_denoised" in vars(base)), "?")
        raise PerResError(f"the model samples with {kind}; PerRes trains ε-prediction and v-prediction models with a "
                          "discrete (DDPM) schedule, and rectified-flow DiTs. Train on the ε- or v-prediction "
                          "checkpoint of the family; if a ModelSampling node changes the model, set it to the "
                          "family's own (eps or v_prediction for SD1.x and SDXL; the DiTs' AuraFlow/Flux sampling).")
    return Schedule(1.0 / (sigmas * sigmas + 1.0), prediction)


def require_trainable(model) -> tuple[ModelFamily, Schedule]:
    """Training needs a denoiser of a supported family with its family's latent channels (not an inpainting or
    instruct variant) and a schedule PerRes trains."""
    family = family_of_model(model)
    config = unet_config_of(model)
    expected = model.model.latent_format.latent_channels
    in_channels = config.get("in_channels", expected)
    if in_channels != expected:
        raise PerResError(f"the model has {in_channels} input channels (an inpainting or instruct model). Train on the "
                          f"regular {family.name} checkpoint; the residual then also applies to the inpainting model.")
    return family, diffusion_schedule(model)


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


def transformer_modules(unet: torch.nn.Module, family: ModelFamily) -> list[tuple[TransformerSlot, torch.nn.Module]]:
    """The family's SpatialTransformers in execution order (UNets; a DiT has none)."""
    return [(slot, unet.get_submodule(slot.path)) for slot in family.slots]


def with_residual_weights(model, residuals: ResidualSet, strength: float):
    """A clone of `model` whose residual layers' weights become W + strength·ΔW when ComfyUI loads it.

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
