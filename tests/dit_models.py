"""Random-weight diffusion transformers, built from the host's own modules, as users load them.

No real weights can be downloaded in CI, so the DiT tests use files whose tensor names and shapes are those of
the host's own module for the released model, with random values:

- the host's detection (comfy.model_detection) is given the few keys it reads to tell the family and its size,
  with the released shapes, and returns the config it would for the released file;
- the host builds that model on the meta device, and every tensor of its state dict is written, drawn like
  sd15_checkpoint's, in bf16 (the released dtype), under the released file's key prefix.

So nothing here hard-codes an architecture beyond those few shapes, and Load Diffusion Model detects each file
as its family. The text encoders and the VAE users load beside them are built the same way from the host's own
modules, under the key names Load CLIP and Load VAE detect: Anima's Qwen3-0.6B (bf16, 1.2 GB), Krea 2's
Qwen3-VL-4B stored all-fp8_e4m3fn (4.4 GB, as users fit it), and the Wan 2.1 VAE both use (0.25 GB).

Anima is built at its exact size (2.09 G parameters, 4.2 GB). Krea 2 (12 B) would not fit beside the suite in
24 GiB: it keeps its exact block architecture and width (6144 features, 48 heads, 12 KV heads, the
text-fusion transformer over 12 Qwen3-VL layers of 2560) with 2 of its 28 blocks; the host reads the depth from
the keys (1.53 G parameters, 3.1 GB). Files are written tensor by tensor (sdxl_checkpoint._stream_safetensors)
and cached (tests/model_cache.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import torch

from model_cache import cached_model, linked_model
from sd15_checkpoint import _random_tensor
from sdxl_checkpoint import _stream_safetensors


@dataclass(frozen=True)
class DitTestModel:
    """One random-weight DiT: what the host must detect it as, and the keys that tell it so."""

    file_name: str
    config_name: str   # the comfy.supported_models class the host detects
    prefix: str        # the released file's key prefix
    detection_keys: Mapping[str, tuple[int, ...]]  # keys (without prefix) the detection reads, released shapes
    zero_centred_norms: bool  # norm scales stored as weight − 1 (Krea 2's RMSNorm adds the 1)
    parameters: int    # of the built module (the tests check it)
    about: str         # for the build's log line


ANIMA_BLOCKS, KREA2_TEST_BLOCKS = 28, 2
ANIMA = DitTestModel(
    file_name="anima_random_arch.safetensors", config_name="Anima", prefix="net.",
    # x_embedder: (16 latent channels + the padding mask) × 2×2 patches → 2048; the LLM adapter marks Anima
    detection_keys={"x_embedder.proj.1.weight": (2048, 68), "llm_adapter.blocks.0.cross_attn.q_proj.weight": (1, 1),
                    **{f"blocks.{i}.mlp.layer1.weight": (1, 1) for i in range(ANIMA_BLOCKS)}},
    zero_centred_norms=False, parameters=2_091_068_928, about="about 4.2 GB, 20 s")
KREA2 = DitTestModel(
    file_name="krea2_random_arch_2blocks.safetensors", config_name="Krea2", prefix="",
    # first: 16 channels × 2×2 patches → 6144 features; 48 query heads and 12 KV heads of 128; 12 text layers of 2560
    detection_keys={"first.weight": (6144, 64), "txtfusion.projector.weight": (1, 12),
                    "txtfusion.layerwise_blocks.0.prenorm.scale": (2560,), "blocks.0.attn.wk.weight": (1536, 6144),
                    **{f"blocks.{i}.attn.wq.weight": (6144, 6144) for i in range(KREA2_TEST_BLOCKS)}},
    zero_centred_norms=True, parameters=1_531_916_364, about="about 3.1 GB, 20 s")
DIT_TEST_MODELS = (ANIMA, KREA2)
# Krea 2's parameters grow by one block's per block beyond the test model's 2 (28 blocks: 12,820,073,036)
KREA2_BLOCK_PARAMETERS = 434_159_872


def krea2_with_blocks(blocks: int) -> DitTestModel:
    """The random Krea 2 with `blocks` blocks (the released 28 for the GPU check; 25.6 GB in bf16)."""
    if blocks == KREA2_TEST_BLOCKS:
        return KREA2
    keys = {name: shape for name, shape in KREA2.detection_keys.items() if not name.endswith(".attn.wq.weight")}
    keys.update({f"blocks.{i}.attn.wq.weight": (6144, 6144) for i in range(blocks)})
    return replace(KREA2, file_name=f"krea2_random_arch_{blocks}blocks.safetensors", detection_keys=keys,
                   parameters=KREA2.parameters + (blocks - KREA2_TEST_BLOCKS) * KREA2_BLOCK_PARAMETERS,
                   about=f"about {blocks * 0.87 + 1.3:.0f} GB")


def detected_config(spec: DitTestModel):
    """The model config the host's detection returns for `spec`'s keys (RuntimeError if it detects another)."""
    import comfy.model_detection

    keys = {spec.prefix + name: torch.empty(shape, device="meta") for name, shape in spec.detection_keys.items()}
    config = comfy.model_detection.model_config_from_unet(keys, spec.prefix)
    if type(config).__name__ != spec.config_name:
        raise RuntimeError(f"the host detects {type(config).__name__}, not {spec.config_name}, from its keys")
    return config


def meta_tensors(spec: DitTestModel) -> dict[str, torch.Tensor]:
    """Every tensor of the host's module for `spec`, by the released file's key, on the meta device."""
    config = detected_config(spec)
    config.set_inference_dtype(torch.bfloat16, None)
    with torch.device("meta"):
        model = config.get_model({}, device="meta")
    return {spec.prefix + name: tensor for name, tensor in model.diffusion_model.state_dict().items()}


def _value(name: str, shape: torch.Size, generator: torch.Generator, zero_centred_norms: bool = False) -> torch.Tensor:
    if zero_centred_norms and len(shape) == 1 and name.endswith(".scale"):
        return torch.zeros(shape)  # stored zero-centred: 0 is a norm weight of 1
    if name.endswith(".gamma"):  # the Wan VAE's RMS-norm scales, shaped (C, 1, 1, 1)
        return torch.ones(shape)
    return _random_tensor(name, shape, generator)


def write_random(path: str, templates: Mapping[str, torch.Tensor], dtype: torch.dtype, seed: int = 0,
                 zero_centred_norms: bool = False) -> str:
    """Write every template's shape, drawn at random, in `dtype` to `path` (one tensor in memory at a time)."""
    order = sorted(templates)
    specs = {name: (templates[name].shape, dtype) for name in order}
    generator = torch.Generator().manual_seed(seed)
    values = ((name, _value(name, templates[name].shape, generator, zero_centred_norms).to(dtype).contiguous())
              for name in order)
    _stream_safetensors(path, specs, values, metadata={"format": "pt"})
    return path


def write_dit_model(spec: DitTestModel, path: str, seed: int = 0) -> str:
    """Write the random model of `spec` (bf16) to `path` and return it."""
    return write_random(path, meta_tensors(spec), torch.bfloat16, seed, spec.zero_centred_norms)


def cached_dit_model(spec: DitTestModel) -> str:
    """The random model of `spec` in the test cache (tests/model_cache.py), built on first use."""
    return cached_model(spec.file_name, lambda path: write_dit_model(spec, path), spec.about)


def link_dit_model(spec: DitTestModel, root: str) -> str:
    """Make the cached model available as `root`/models/diffusion_models/<file name> (a symlink)."""
    return linked_model(root, "diffusion_models", spec.file_name, lambda: cached_dit_model(spec))


# --- the text encoders and the VAE loaded beside them -----------------------------------------------------------

def _anima_text_encoder() -> dict[str, torch.Tensor]:
    """Qwen3-0.6B as Load CLIP reads it (keys model.*): the transformer of the host's Anima text encoder."""
    import comfy.text_encoders.anima

    with torch.device("meta"):
        encoder = comfy.text_encoders.anima.te()(device="meta", dtype=torch.bfloat16)
    return encoder.qwen3_06b.transformer.state_dict()


def _krea2_text_encoder() -> dict[str, torch.Tensor]:
    """Qwen3-VL-4B under the released file's names (model.language_model.*, model.visual.*), which Load CLIP
    (type krea2) maps onto the host's Krea 2 text encoder."""
    import comfy.text_encoders.krea2

    with torch.device("meta"):
        encoder = comfy.text_encoders.krea2.te()(device="meta", dtype=torch.bfloat16)
    renamed = {"model.": "model.language_model.", "visual.": "model.visual."}
    return {next(new + name[len(old):] for old, new in renamed.items() if name.startswith(old)): tensor
            for name, tensor in encoder.qwen3vl_4b.transformer.state_dict().items()}


def _wan21_vae() -> dict[str, torch.Tensor]:
    """The Wan 2.1 VAE (96 channels) as Load VAE reads it: the host's own WanVAE."""
    import comfy.ldm.wan.vae

    with torch.device("meta"):
        vae = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                       temperal_downsample=[False, True, True], image_channels=3,
                                       conv_out_channels=3, dropout=0.0)
    return vae.state_dict()


@dataclass(frozen=True)
class TestFile:
    """A random file users load beside a DiT: where it goes (models/<folder>) and what it holds."""

    file_name: str
    folder: str
    tensors: Callable[[], dict[str, torch.Tensor]]
    dtype: torch.dtype
    about: str

    def cached(self) -> str:
        return cached_model(self.file_name, lambda path: write_random(path, self.tensors(), self.dtype), self.about)

    def link(self, root: str) -> str:
        return linked_model(root, self.folder, self.file_name, self.cached)


ANIMA_TEXT_ENCODER = TestFile("qwen3_06b_random_arch.safetensors", "text_encoders", _anima_text_encoder,
                              torch.bfloat16, "0.6 G parameters, about 1.2 GB")
KREA2_TEXT_ENCODER = TestFile("qwen3vl_4b_random_arch_fp8.safetensors", "text_encoders", _krea2_text_encoder,
                              torch.float8_e4m3fn, "4.4 G parameters, about 4.4 GB")
WAN21_VAE = TestFile("wan21_vae_random_arch.safetensors", "vae", _wan21_vae, torch.bfloat16,
                     "0.13 G parameters, about 0.25 GB")
# family → (text encoder, the `type` Load CLIP needs for it, VAE)
COMPANIONS = {"Anima": (ANIMA_TEXT_ENCODER, "stable_diffusion", WAN21_VAE),
              "Krea2": (KREA2_TEXT_ENCODER, "krea2", WAN21_VAE)}


def use_model_folder(root: str, folder: str) -> None:
    """Make the host read models/`folder` from `root` (the tests' own models folder)."""
    import folder_paths

    _, extensions = folder_paths.folder_names_and_paths[folder]
    folder_paths.folder_names_and_paths[folder] = ([os.path.join(root, "models", folder)], extensions)


def stock_loaded(spec: DitTestModel, root: str, weight_dtype: str = "default"):
    """(model, clip, vae) of `spec` through Load Diffusion Model (`weight_dtype`), Load CLIP and Load VAE, as users
    load them, from the cached files linked under `root`/models (the host's workdir)."""
    from comfy_host import run_node

    text_encoder, clip_type, vae_file = COMPANIONS[spec.config_name]
    link_dit_model(spec, root)
    text_encoder.link(root)
    vae_file.link(root)
    for folder in ("diffusion_models", "text_encoders", "vae"):
        use_model_folder(root, folder)
    (model,) = run_node("UNETLoader", unet_name=spec.file_name, weight_dtype=weight_dtype)
    (clip,) = run_node("CLIPLoader", clip_name=text_encoder.file_name, type=clip_type)
    (vae,) = run_node("VAELoader", vae_name=vae_file.file_name)
    return model, clip, vae
