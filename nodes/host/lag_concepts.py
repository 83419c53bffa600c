"""What a LAG concept changes in the UNet: a PerRes residual, or any SD1.x or SDXL LoRA read by ComfyUI itself.

A LoRA file goes through ComfyUI's own pipeline, as LoraLoaderModelOnly does: lora_convert, the UNet's
key map (model_lora_keys_unet: kohya, diffusers/PEFT, LyCORIS names) and the weight adapters of
comfy.lora.load_lora (LoRA, LoCon, LoHa, LoKr, DoRA, full diffs). Nothing here parses key names.
Plain LoRA factors stay factors (LowRankDelta, two thin products at run time); every other adapter is
turned into ΔW = calculate_weight(W) − W once per layer, on the sampling device, by the host's own
arithmetic (DenseDelta). The text-encoder part of a LoRA is not applied: its effect on the prompt is not
tied to image locations (like LoraLoaderModelOnly).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


from .entry_points import comfy, folder_paths  # the host's modules, imported and checked in one place
from ...perres_core.errors import PerResError
from ...perres_core.families import ModelFamily, a_model, family_of_context_width, family_of_lora_keys
from ...perres_core.lag_layers import Role, placement
from ...perres_core.layer_delta import ConvGeometry, DeltaSum, DenseDelta, LayerDelta, LowRankDelta
from ...perres_core.residual import ResidualSet, family_of
from .model import family_of_model, unet_of

log = logging.getLogger("perres")
UNET_PREFIX = "diffusion_model."
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te_", "te1", "te2", "clip_")


@dataclass
class ConceptSpec:
    """One concept of a LAG chain, before it meets the model: a PerRes residual or a LoRA file."""

    words: list[str]
    strength: float
    residuals: Optional[ResidualSet] = None
    lora: Optional[dict[str, torch.Tensor]] = None
    lora_name: str = ""
    notes: list[str] = field(default_factory=list)   # shown on the LAG node once the model is known

    @property
    def label(self) -> str:
        return self.lora_name or ", ".join(self.words)


def residual_deltas(residuals: ResidualSet, strength: float) -> dict[str, LayerDelta]:
    """The proj_out residuals (1×1 convs on SD1.x, Linear layers on SDXL) with the strength folded into A."""
    if strength == 0:
        return {}
    geometry = None if family_of(residuals).linear_proj_out else ConvGeometry()
    return {path: LowRankDelta(layer.up, layer.down, strength, geometry) for path, layer in residuals.layers.items()}


def load_lora_file(lora_name: str) -> dict[str, torch.Tensor]:
    """The tensors of models/loras/<lora_name>; only .safetensors files are read."""
    if not lora_name:
        raise PerResError("no LoRA is selected; put an SD1.x or SDXL LoRA (.safetensors) in ComfyUI/models/loras and "
                          "pick it.")
    if not lora_name.lower().endswith(".safetensors"):
        raise PerResError(f"'{lora_name}' is not a .safetensors file; PerRes reads only safetensors (other formats "
                          "can run code when loaded). Convert it, or pick a .safetensors LoRA.")
    path = folder_paths.get_full_path("loras", lora_name)
    if path is None:
        raise PerResError(f"LoRA '{lora_name}' is not in ComfyUI/models/loras; refresh the node list or pick another.")
    return comfy.utils.load_torch_file(path, safe_load=True)


def _dense(module: torch.nn.Module, key: str, patch, strength: float) -> Callable:
    """ΔW (or Δbias) of a non-factorized adapter, computed by the host's calculate_weight on demand."""
    def compute(device: torch.device) -> torch.Tensor:
        current = getattr(module, key.rsplit(".", 1)[1]).detach().to(device, torch.float32)
        changed = comfy.lora.calculate_weight([(strength, patch, 1.0, None, None)], current.clone(), key)
        return changed.float() - current
    return compute


def _low_rank(module: torch.nn.Module, patch, strength: float, name: str, path: str,
              family: ModelFamily) -> Optional[LowRankDelta]:
    """A plain LoRA/LoCon factor pair as a LowRankDelta, or None where only the merged ΔW is exact."""
    if not isinstance(patch, comfy.weight_adapter.LoRAAdapter):
        return None
    up, down, alpha, mid, dora_scale, reshape = patch.weights
    if mid is not None or dora_scale is not None or reshape is not None:
        return None
    rank = down.shape[0]
    conv = isinstance(module, torch.nn.Conv2d)
    weight = module.weight
    if up.shape[0] != weight.shape[0] or down[0].numel() != weight[0].numel():
        raise PerResError(f"LoRA '{name}': its factors for {path} have shapes {tuple(up.shape)} and "
                          f"{tuple(down.shape)}, which do not fit that layer's weight {tuple(weight.shape)}; the file "
                          f"is for another model than this {family.name} one, or damaged.")
    if conv:
        down = down.reshape(rank, *weight.shape[1:])
    else:
        up, down = up.reshape(up.shape[0], rank), down.reshape(rank, -1)
    scale = strength * (alpha / rank if alpha is not None else 1.0)
    return LowRankDelta(up, down, scale, ConvGeometry.of(module) if conv else None)


# the down (input-side) factor of a cross-attention key/value projection, in each format the host reads:
# its input width is the width of the text the LoRA was trained with
_TEXT_PROJECTIONS = ("attn2_to_k", "attn2_to_v", "attn2.to_k", "attn2.to_v", "attn2.processor.to_k",
                     "attn2.processor.to_v")
_DOWN_FACTORS = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", ".hada_w1_b", ".hada_w2_b")


def lora_family(lora: dict[str, torch.Tensor]) -> tuple[Optional[ModelFamily], str]:
    """(the family a LoRA was trained for, how that shows), or (None, "") when nothing tells: a UNet LoRA by the
    text width its cross-attention factors read (not a LoRA of self-attention only, or LoKr), a DiT LoRA by its
    layer names."""
    for key, tensor in lora.items():
        if tensor.dim() == 2 and key.endswith(_DOWN_FACTORS) and any(p in key for p in _TEXT_PROJECTIONS):
            family = family_of_context_width(tensor.shape[1])
            return family, f"its cross-attention reads {tensor.shape[1]}-wide text"
    denoiser_keys = [key for key in lora if not key.startswith(TEXT_ENCODER_PREFIXES)]
    family = family_of_lora_keys(denoiser_keys)
    if family is not None:
        example = next(key for key in denoiser_keys if any(mark in key for mark in family.lora_marks))
        return family, f"its layer names are {family.name}'s, e.g. '{example}'"
    return None, ""


def require_lora_family(lora: dict[str, torch.Tensor], family: ModelFamily, name: str) -> None:
    """Refuse a LoRA of another family, naming both (an SD1.x file's layer names partly match SDXL's)."""
    trained_for, evidence = lora_family(lora)
    if trained_for is not None and trained_for is not family:
        raise PerResError(f"LoRA '{name}' is {a_model(trained_for.name, 'LoRA')} ({evidence}), but this model is "
                          f"{family.name}; LoRAs only fit the family they were trained on. Use it on "
                          f"{a_model(trained_for.name)}, or pick {a_model(family.name, 'LoRA')}.")


def lora_deltas(model, lora: dict[str, torch.Tensor], strength: float, name: str) -> tuple[dict[str, LayerDelta], list[str]]:
    """(layer path → delta, notes for the user) of a LoRA on this model's UNet."""
    family = family_of_model(model)
    require_lora_family(lora, family, name)
    unet = unet_of(model)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map, log_missing=False)
    parts: dict[str, list[LayerDelta]] = {}
    skipped = []
    for key, patch in patches.items():
        if not isinstance(key, str) or not key.startswith(UNET_PREFIX):
            skipped.append(str(key))
            continue
        path, param = key[len(UNET_PREFIX):].rsplit(".", 1)
        module = unet.get_submodule(path)
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or param not in ("weight", "bias"):
            skipped.append(path)   # norms: their change cannot be expressed as a function of the layer input
            continue
        geometry = ConvGeometry.of(module) if isinstance(module, torch.nn.Conv2d) else None
        delta = _low_rank(module, patch, strength, name, path, family) if param == "weight" else None
        if delta is None:
            compute = _dense(module, key, patch, strength)
            delta = DenseDelta(compute, geometry, is_bias=param == "bias")
        parts.setdefault(path, []).append(delta)
    if not parts:
        kinds = "text-encoder only" if any(k.startswith(TEXT_ENCODER_PREFIXES) for k in lora) else "for another model"
        denoiser = "diffusion transformer" if family.is_dit else "UNet"
        raise PerResError(f"LoRA '{name}' changes no layer of this {family.name} {denoiser} ({len(lora)} tensors, "
                          f"apparently {kinds}). PerRes LAG LoRA needs {a_model(family.name, 'LoRA')} that trains the "
                          f"{denoiser}.")
    notes = []
    if strength != 0 and any(k.startswith(TEXT_ENCODER_PREFIXES) for k in lora):
        notes.append(f"LoRA '{name}': its text-encoder part is not applied (LAG localizes only UNet layers); "
                     "add it with a stock LoRA loader's strength_clip if you need it everywhere.")
    if skipped:
        notes.append(f"LoRA '{name}': {len(skipped)} changed layer(s) cannot be localized and are left out "
                     f"({', '.join(sorted(skipped)[:3])}{', ...' if len(skipped) > 3 else ''}).")
    deltas = {path: group[0] if len(group) == 1 else DeltaSum(tuple(group)) for path, group in parts.items()}
    if strength == 0:
        return {}, notes
    global_layers = sorted(p for p in deltas if placement(p, family).role is Role.GLOBAL)
    if global_layers:
        shown = ", ".join(global_layers[:3]) + (f" and {len(global_layers) - 3} more" if len(global_layers) > 3 else "")
        what = "layers with no image locations (timestep embedding or modulation, text fusion, LLM adapter)" \
            if family.is_dit else "the timestep embedding"
        notes.append(f"LoRA '{name}': it changes {what} ({shown}); LAG leaves them to the base model.")
    return deltas, notes
