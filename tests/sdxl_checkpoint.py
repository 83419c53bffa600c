"""Build a random-weight checkpoint with the exact SDXL base architecture.

The SDXL twin of sd15_checkpoint.py: no real SDXL weights can be downloaded in CI, so the tests that
need an SDXL-sized model (2.6 G parameters: UNet, CLIP-L + CLIP-G text encoders, KL VAE) use a
checkpoint whose tensor names and shapes are those of the SDXL base checkpoint and whose values are
random. ComfyUI's own detection (comfy.sd.load_checkpoint_guess_config, CheckpointLoaderSimple) then
treats it as supported_models.SDXL / model_base.SDXL, and every code path a user's SDXL checkpoint
takes (loading, weight patching, ADM conditioning, sampling) is exercised for real.

Shapes come from ComfyUI's own module definitions built on the meta device, and the text encoder keys
from the host's own SDXL.process_clip_state_dict_for_saving, so nothing here hard-codes tensor names.

The file is about 7 GB in fp16. It is written tensor by tensor into the safetensors layout (header
first, then each tensor's bytes as soon as it is drawn), so the build holds one tensor at a time in
memory (well under 1 GB) instead of the whole model.

`v_prediction=True` adds the `v_pred` and `ztsnr` marker keys that NoobAI-style checkpoints carry, so
that ComfyUI detects ModelType.V_PREDICTION with zero-terminal-SNR sampling. That variant is a second
7 GB file, so nothing builds or caches it unless asked.
"""
from __future__ import annotations

import json
from typing import Iterator

import torch

from model_cache import cached_model, linked_model
from sd15_checkpoint import SD15_VAE_DDCONFIG, _random_tensor

CHECKPOINT_NAME = "sdxl_random_arch.safetensors"
VPRED_CHECKPOINT_NAME = "sdxl_random_arch_vpred_ztsnr.safetensors"

# What ComfyUI's detection (comfy/model_detection.py) yields for the SDXL base checkpoint, with
# num_head_channels from supported_models_base.BASE.unet_extra_config (it does not change any shape);
# the keys of comfy.supported_models.SDXL.unet_config are taken from the host at build time.
SDXL_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL_VAE_DDCONFIG = SD15_VAE_DDCONFIG  # same KL autoencoder; only the latent format (scale) differs

# safetensors dtype names of the dtypes written here
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64",
              torch.float8_e4m3fn: "F8_E4M3"}
_MARKER_KEYS = ("v_pred", "ztsnr")


def sdxl_unet_config() -> dict:
    """The UNetModel config of SDXL base: the detected config, with the host's SDXL.unet_config on top."""
    import comfy.supported_models

    return {**SDXL_UNET_CONFIG, **comfy.supported_models.SDXL.unet_config}


def _meta_tensors(v_prediction: bool = False) -> dict[str, torch.Tensor]:
    """Checkpoint keys of SDXL base mapped to meta tensors (or to the real value, where the host fixes one)."""
    import comfy.ops
    import comfy.sdxl_clip
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet_config = sdxl_unet_config()
    with torch.device("meta"):
        unet = UNetModel(**unet_config, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float32)
        vae = AutoencoderKL(ddconfig=SDXL_VAE_DDCONFIG, embed_dim=4)

    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", vae)):
        for name, tensor in module.state_dict().items():
            tensors[prefix + name] = tensor
    # conditioner.embedders.0.transformer.* (CLIP-L) and conditioner.embedders.1.model.* (OpenCLIP-G,
    # text_projection and logit_scale included, as in the real SDXL base file)
    model_config = comfy.supported_models.SDXL(unet_config)
    tensors.update(model_config.process_clip_state_dict_for_saving(clip.state_dict()))
    if v_prediction:
        for marker in _MARKER_KEYS:
            tensors[marker] = torch.tensor([])
    return tensors


def _tensor_values(name: str, template: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The value written for one key: real values are kept, meta ones drawn like sd15_checkpoint's."""
    if template.device.type != "meta":
        value = template
    else:
        # open_clip's packed attention biases (in_proj_bias) are biases too: zero, like every other bias
        value = _random_tensor(name.replace("in_proj_bias", "in_proj.bias"), template.shape, generator)
    return (value.to(torch.float16) if template.dtype.is_floating_point else value.to(template.dtype)).contiguous()


def _stream_safetensors(path: str, specs: dict[str, tuple[torch.Size, torch.dtype]],
                        values: Iterator[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """Write a safetensors file whose header is known up front, taking tensor data one tensor at a time.

    Same layout as safetensors.torch.save_file (8-byte header length, JSON header padded with spaces to
    8 bytes, tensors sorted by alignment then name, no gaps), but without holding every tensor at once.
    """
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, (shape, dtype) in specs.items():
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for expected, (name, tensor) in zip(specs, values):
            if name != expected or tensor.shape != specs[name][0] or tensor.dtype != specs[name][1]:
                raise RuntimeError(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} does not match the header")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        if f.tell() != 8 + len(blob) + offset:
            raise RuntimeError(f"{path}: wrote {f.tell()} bytes, the header promised {8 + len(blob) + offset}")


def write_sdxl_checkpoint(path: str, seed: int = 0, v_prediction: bool = False) -> str:
    """Write the random SDXL-base-architecture checkpoint (fp16) to `path` and return it.

    v_prediction: add the `v_pred` and `ztsnr` marker keys (ComfyUI then detects a v-prediction,
    zero-terminal-SNR SDXL model, like NoobAI-XL v-pred).
    """
    templates = _meta_tensors(v_prediction)

    def itemsize(dtype: torch.dtype) -> int:
        return torch.empty((), dtype=dtype).element_size()

    out_dtype = {name: torch.float16 if t.dtype.is_floating_point else t.dtype for name, t in templates.items()}
    order = sorted(templates, key=lambda name: (-itemsize(out_dtype[name]), name))
    specs = {name: (templates[name].shape, out_dtype[name]) for name in order}
    generator = torch.Generator().manual_seed(seed)
    values = ((name, _tensor_values(name, templates[name], generator)) for name in order)
    _stream_safetensors(path, specs, values, metadata={"format": "pt"})
    return path


def cached_sdxl_checkpoint(v_prediction: bool = False) -> str:
    """The random SDXL checkpoint in the test cache (tests/model_cache.py), built on first use.

    v_prediction=True caches a second 7 GB file (VPRED_CHECKPOINT_NAME); the default builds only one.
    """
    return cached_model(VPRED_CHECKPOINT_NAME if v_prediction else CHECKPOINT_NAME,
                        lambda path: write_sdxl_checkpoint(path, v_prediction=v_prediction),
                        "about 7 GB, a few minutes")


def link_sdxl_checkpoint(root: str, name: str = CHECKPOINT_NAME, v_prediction: bool = False) -> str:
    """Make the cached random SDXL checkpoint available as `root`/models/checkpoints/`name` (a symlink)."""
    return linked_model(root, "checkpoints", name, lambda: cached_sdxl_checkpoint(v_prediction))
