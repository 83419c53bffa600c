"""Every bad input gets a clear error, and nothing is lost (reliability and security).

Each case runs the real node classes inside the real ComfyUI host (in-process) and checks that the
message names the node, says what was wrong and how to fix the workflow. Non-SD1 models are real
ComfyUI model objects built on the meta device (no weights); the SD1.5 inpainting model is a real
9-channel UNet loaded from the random SD1.5 checkpoint. Diverging and cancelled training runs go
through ComfyUI's own PromptExecutor, so "nothing saved" is checked for a whole Train → Save workflow.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import pickle
import struct
import subprocess
import sys
import uuid

import pytest
import torch
from PIL import Image

from conftest import pack, prompt_executor, run_node
from sd15_checkpoint import SD15_UNET_CONFIG

pytestmark = pytest.mark.every_host  # each host's model detection, loaders and executor

TRAIN = "PerRes Train Residuals"
APPLY = "PerRes Apply Residuals"
LAG = "PerRes LAG Sampling"
LOAD = "PerRes Load Residuals"
SAVE = "PerRes Save Residuals"
IMAGES = "PerRes Load Concept Images"
SUB = "perres_bad_inputs"  # our files under models/loras and input/


def perres_error():
    return pack("perres_core.errors").PerResError


def expect_error(node: str, *fragments: str, call):
    """Run `call`, expect a PerResError whose message starts with `node` and contains every fragment."""
    with pytest.raises(perres_error()) as info:
        call()
    message = str(info.value)
    assert message.startswith(node + ": "), message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), f"{fragment!r} not in {message!r}"
    return message


class LogCapture(logging.Handler):
    """Collects the pack's log records (module-scoped fixtures cannot use caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> "LogCapture":
        logging.getLogger("perres").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("perres").removeHandler(self)


def tree(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files}


def partial_files(root: str) -> list[str]:
    return [p for p in tree(root) if p.endswith(".partial")]


def train_inputs(sd15, images, **overrides) -> dict:
    model, clip, vae = sd15
    inputs = dict(model=model, clip=clip, vae=vae, images=images, identifier="sks", class_word="dog", steps=1,
                  batch_size=2, learning_rate=1e-3, rank_ratio=0.05, resolution=64, seed=0, init="random")
    inputs.update(overrides)
    return inputs


def small_residuals(seed: int = 0):
    residual = pack("perres_core.residual")
    residuals = residual.ResidualSet.create(pack("perres_core.families").SD1.layer_shapes(), 0.05,
                                            concept=residual.ConceptInfo("sks", "dog"))
    residuals.initialize("random", seed)
    return residuals


@pytest.fixture(scope="module")
def residuals():
    return small_residuals()


@pytest.fixture(scope="module")
def images4() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.rand(4, 64, 64, 3, generator=generator)


# ------------------------------------------------------------------------------------------------
# 1. Models
# ------------------------------------------------------------------------------------------------

SDXL_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
                 num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
                 transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048,
                 num_head_channels=64, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 use_temporal_attention=False, use_temporal_resblock=False)
SD2_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                use_linear_in_transformer=True, context_dim=1024, num_head_channels=64,
                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_attention=False,
                use_temporal_resblock=False)


def flux_dev_keys() -> dict:
    """The FLUX.1-dev keys ComfyUI's model detection reads, as meta tensors (shapes only, no memory).

    Flux is built through detection, as Load Checkpoint / Load Diffusion Model build it, because its
    parameter list (FluxParams) grows between ComfyUI releases.
    """
    hidden = 3072
    keys = {"img_in.weight": (hidden, 64), "txt_in.weight": (hidden, 4096), "vector_in.in_layer.weight": (hidden, 768),
            "guidance_in.in_layer.weight": (hidden, 256)}
    keys.update({f"double_blocks.{i}.img_attn.norm.key_norm.scale": (128,) for i in range(19)})
    keys.update({f"single_blocks.{i}.norm.key_norm.scale": (128,) for i in range(38)})
    return {key: torch.empty(shape, device="meta") for key, shape in keys.items()}


def meta_model(family: str, model_type=None):
    """A real ComfyUI ModelPatcher of the given family, with every weight on the meta device (no memory)."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models as supported

    if family == "Flux":
        import comfy.model_detection

        config = comfy.model_detection.model_config_from_unet(flux_dev_keys(), "")
        assert isinstance(config, supported.Flux), f"ComfyUI detects {type(config).__name__}, not Flux"
    elif family in ("Anima", "Krea2"):
        from dit_models import DIT_TEST_MODELS, detected_config

        config = detected_config(next(spec for spec in DIT_TEST_MODELS if spec.config_name == family))
    else:
        config_class, unet = {"SDXL": (supported.SDXL, SDXL_UNET), "SD20": (supported.SD20, SD2_UNET),
                              "SD15": (supported.SD15, SD15_UNET_CONFIG)}[family]
        config = config_class(dict(unet))
    config.set_inference_dtype(torch.float32, None)
    with torch.device("meta"):
        if model_type is None:
            base = config.get_model({}, device="meta")
        else:
            base = comfy.model_base.BaseModel(config, model_type=model_type, device="meta")
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


FAMILY_FRAGMENTS = {
    ("SDXL", None): ("trained on an SD1.x model, but this model is SDXL", "Load an SD1.x checkpoint"),
    ("SD20", None): ("SD20", "Linear, not 1×1 convs", "PerRes supports SD1.x", "SDXL"),
    ("Flux", None): ("Flux", "PerRes supports SD1.x", "SDXL", "Load a checkpoint of one of these families"),
}


@pytest.mark.parametrize("node", ["apply", "lag", "train"])
@pytest.mark.parametrize("family", ["SDXL", "SD20", "Flux"])
def test_a_model_of_another_family_is_refused(family, node, sd15, residuals, images4):
    """SD2.x and Flux are refused by every node; SDXL takes the SD1.x residual nowhere (Apply nor LAG)."""
    if (family, node) == ("SDXL", "train"):
        pytest.skip("SDXL trains (tests/test_host_sdxl.py)")
    model = meta_model(family)
    _, clip, _ = sd15
    calls = {
        "apply": (APPLY, lambda: run_node("PerResApplyResiduals", model=model, residuals=residuals, strength=1.0)),
        "lag": (LAG, lambda: run_node("PerResLAGSampling", model=model, clip=clip, residuals=residuals,
                                      prompt="a photo of a sks dog", concept_words="", strength=1.0,
                                      threshold="median", quantile=0.5, start_percent=0.0, end_percent=1.0,
                                      outside_window="full residual")),
        "train": (TRAIN, lambda: run_node("PerResTrainResiduals", **train_inputs(sd15, images4, model=model))),
    }
    name, call = calls[node]
    expect_error(name, *FAMILY_FRAGMENTS.get((family, node), FAMILY_FRAGMENTS.get((family, None))), call=call)


def test_the_prediction_type_comes_from_the_models_sampling(sd15):
    """ε and v-prediction are trained (v also with zero-terminal SNR, set by the stock ModelSamplingDiscrete
    node as users do for NoobAI-style checkpoints); an EDM or x0 model is refused, naming what it samples with."""
    host = pack("nodes.host.model")
    model = sd15[0]
    assert host.diffusion_schedule(model).prediction == "epsilon"
    v_model = run_node("ModelSamplingDiscrete", model=model, sampling="v_prediction", zsnr=False)[0]
    assert host.diffusion_schedule(v_model).prediction == "v"
    zsnr = run_node("ModelSamplingDiscrete", model=model, sampling="v_prediction", zsnr=True)[0]
    schedule = host.diffusion_schedule(zsnr)
    assert schedule.prediction == "v" and float(schedule.alphas_cumprod[-1]) < 1e-6
    assert float(host.diffusion_schedule(model).alphas_cumprod[-1]) > 1e-3
    for refused in (run_node("ModelSamplingContinuousEDM", model=model, sampling="edm", sigma_max=120.0,
                             sigma_min=0.002)[0],
                    run_node("ModelSamplingDiscrete", model=model, sampling="x0", zsnr=False)[0]):
        with pytest.raises(pack("perres_core.errors").PerResError, match="trains ε-prediction and v-prediction"):
            host.diffusion_schedule(refused)


@pytest.fixture(scope="module")
def inpaint_model(workdir, checkpoint_name):
    """A real SD1.5 inpainting model (9 input channels), built from the random checkpoint's UNet."""
    import comfy.sd
    from safetensors import safe_open

    path = os.path.realpath(os.path.join(workdir, "models", "checkpoints", checkpoint_name))
    prefix = "model.diffusion_model."
    state = {}
    with safe_open(path, framework="pt") as handle:
        for key in handle.keys():
            if key.startswith(prefix):
                state[key[len(prefix):]] = handle.get_tensor(key)
    weight = state["input_blocks.0.0.weight"]
    extra = torch.randn(weight.shape[0], 5, *weight.shape[2:], generator=torch.Generator().manual_seed(0)) * 0.01
    state["input_blocks.0.0.weight"] = torch.cat([weight, extra.to(weight.dtype)], dim=1)
    model = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float16})
    del state
    assert model.model.model_config.unet_config["in_channels"] == 9 and model.model.concat_keys
    yield model
    del model


def test_inpainting_model_training_is_refused_with_explanation(sd15, inpaint_model, images4):
    expect_error(TRAIN, "9 input channels", "inpainting", "Train on the regular SD1.x checkpoint",
                 call=lambda: run_node("PerResTrainResiduals", **train_inputs(sd15, images4, model=inpaint_model)))


def test_inpainting_model_apply_is_supported(inpaint_model, residuals):
    (patched,) = run_node("PerResApplyResiduals", model=inpaint_model, residuals=residuals, strength=1.0)
    keys = {key for key in patched.patches if key.endswith("proj_out.weight")}
    assert len(keys) == 16, sorted(patched.patches)[:5]
    assert not inpaint_model.patches  # the input model is never modified


def test_inpainting_model_lag_sampling_is_supported(sd15, inpaint_model, residuals):
    _, clip, _ = sd15
    model, positive = run_node("PerResLAGSampling", model=inpaint_model, clip=clip, residuals=residuals,
                               prompt="a photo of a sks dog", concept_words="", strength=1.0, threshold="median",
                               quantile=0.5, start_percent=0.0, end_percent=1.0, outside_window="full residual")
    negative = run_node("CLIPTextEncode", clip=clip, text="")[0]
    latent = run_node("EmptyLatentImage", width=64, height=64, batch_size=1)[0]
    samples = run_node("KSampler", model=model, seed=0, steps=1, cfg=5.0, sampler_name="euler", scheduler="normal",
                       positive=positive, negative=negative, latent_image=latent, denoise=1.0)[0]["samples"]
    assert samples.shape == (1, 4, 8, 8) and torch.isfinite(samples).all()
    assert pack("nodes.host.lag_patch").LagPatch.of(model).recorder.averages(), "LAG masks were not computed"


# ------------------------------------------------------------------------------------------------
# 2. Residual files
# ------------------------------------------------------------------------------------------------

def write_raw_safetensors(path: str, header, data: bytes = b"") -> None:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded + data)


def valid_state_and_metadata():
    residual_file = pack("perres_core.residual_file")
    residuals = small_residuals(1)
    return residual_file.residuals_to_state_dict(residuals), residual_file.residuals_metadata(residuals, "test")


def save_state(path: str, state, metadata) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=metadata)


def make_ordinary_lora(path):
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_mid_block_attentions_0_proj_in"):
        state[name + ".lora_up.weight"] = torch.randn(320, 4, 1, 1, generator=generator)
        state[name + ".lora_down.weight"] = torch.randn(4, 320, 1, 1, generator=generator)
        state[name + ".alpha"] = torch.tensor(4.0)
    save_state(path, state, {"ss_network_module": "networks.lora"})


def make_checkpoint_like(path):
    save_state(path, {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, {})


def make_truncated(path):
    make_valid(path)
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])


def make_truncated_header(path):
    make_valid(path)
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[:100])


def make_random_bytes(path):
    with open(path, "wb") as handle:
        handle.write(os.urandom(4096))


def make_non_object_header(path):
    write_raw_safetensors(path, [1, 2, 3], b"\0" * 8)


def make_valid(path):
    state, metadata = valid_state_and_metadata()
    save_state(path, state, metadata)


def make_wrong_shapes(path):
    state, metadata = valid_state_and_metadata()
    prefix = "lora_unet_down_blocks_1_attentions_0_proj_out"  # a 640-channel layer
    state[prefix + ".lora_up.weight"] = torch.zeros(320, 16, 1, 1)
    state[prefix + ".lora_down.weight"] = torch.zeros(16, 320, 1, 1)
    save_state(path, state, metadata)


def make_rank_mismatch(path):
    state, metadata = valid_state_and_metadata()
    prefix = "lora_unet_down_blocks_0_attentions_0_proj_out"
    state[prefix + ".lora_down.weight"] = torch.zeros(8, 320, 1, 1)
    save_state(path, state, metadata)


def make_with_extra_key(path):
    state, metadata = valid_state_and_metadata()
    state["model.diffusion_model.out.2.weight"] = torch.zeros(4, 320, 3, 3)
    save_state(path, state, metadata)


def make_one_dim_factor(path):
    state, metadata = valid_state_and_metadata()
    state["lora_unet_mid_block_attentions_0_proj_out.lora_up.weight"] = torch.zeros(1280)
    save_state(path, state, metadata)


def make_alpha_vector(path):
    state, metadata = valid_state_and_metadata()
    state["lora_unet_mid_block_attentions_0_proj_out.alpha"] = torch.ones(3)
    save_state(path, state, metadata)


def make_with_value(value):
    def make(path):
        state, metadata = valid_state_and_metadata()
        key = "lora_unet_mid_block_attentions_0_proj_out.lora_up.weight"
        state[key] = state[key].clone()
        state[key][0, 0] = value
        save_state(path, state, metadata)
    return make


def make_with_metadata(**changes):
    def make(path):
        state, metadata = valid_state_and_metadata()
        for key, value in changes.items():
            if value is None:
                metadata.pop("perres." + key, None)
            else:
                metadata["perres." + key] = value
        save_state(path, state, metadata)
    return make


class _Sentinel:
    """Unpickling this creates a directory: proof that a pickle was (wrongly) executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def make_pickle(path):
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": _Sentinel(path + ".UNPICKLED")}, handle)


def make_huge_sparse(path):
    limit = pack("perres_core.residual_file").MAX_FILE_BYTES
    with open(path, "wb") as handle:
        handle.truncate(limit + 1024 * 1024)  # sparse: costs no disk space


RESIDUAL_FILE_CASES = [
    # id, file name, maker, expected message fragments (what + how to fix)
    ("ordinary_lora", "lora.safetensors", make_ordinary_lora, ("ordinary LoRA", "not a PerRes residual", "LoraLoader")),
    ("checkpoint_like", "checkpoint.safetensors", make_checkpoint_like,
     ("not a PerRes residual", "PerRes Save Residuals")),
    ("foreign_keys_with_metadata", "foreign.safetensors", make_with_extra_key,
     ("not proj_out residuals of SD1.x or SDXL", "PerRes Save Residuals")),
    ("truncated_data", "truncated.safetensors", make_truncated, ("truncated or corrupt", "copy the file again")),
    ("truncated_header", "truncated_header.safetensors", make_truncated_header,
     ("truncated or corrupt", "copy the file again")),
    ("random_bytes", "random.safetensors", make_random_bytes, ("truncated or corrupt", "copy the file again")),
    ("header_not_an_object", "header_list.safetensors", make_non_object_header,
     ("corrupt", "copy the file again")),
    ("shapes_do_not_fit", "wrong_shapes.safetensors", make_wrong_shapes,
     ("input_blocks.4.1.proj_out", "do not fit SD1.x's 640×640 proj_out", "train the residual again")),
    ("rank_mismatch", "rank_mismatch.safetensors", make_rank_mismatch, ("input_blocks.1.1.proj_out", "do not fit")),
    ("factor_not_a_matrix", "one_dim.safetensors", make_one_dim_factor,
     ("not low-rank factors", "copy the file again")),
    ("alpha_not_a_number", "alpha.safetensors", make_alpha_vector, ("alpha of shape", "copy the file again")),
    ("nan_values", "nan.safetensors", make_with_value(float("nan")), ("NaN or Inf", "lower learning rate")),
    ("inf_values", "inf.safetensors", make_with_value(float("inf")), ("NaN or Inf", "lower learning rate")),
    ("metadata_missing_identifier", "no_identifier.safetensors", make_with_metadata(identifier=None),
     ("lacks the identifier", "Re-save it")),
    ("metadata_garbled_rank_ratio", "garbled_ratio.safetensors", make_with_metadata(rank_ratio="lots"),
     ("garbled metadata", "Re-save")),
    ("metadata_nan_rank_ratio", "nan_ratio.safetensors", make_with_metadata(rank_ratio="nan"),
     ("garbled metadata", "Re-save")),
    ("metadata_garbled_template", "garbled_template.safetensors",
     make_with_metadata(caption_template="a photo of {nobody}"), ("garbled metadata", "Re-save")),
    ("metadata_future_format", "future.safetensors", make_with_metadata(format="99"),
     ("format '99'", "Update the pack")),
    ("pickle_pt", "weights.pt", make_pickle, ("pickle file", "never unpickles", "Only .safetensors")),
    ("pickle_ckpt", "weights.ckpt", make_pickle, ("pickle file", "never unpickles", "Only .safetensors")),
    ("pickle_renamed_safetensors", "disguised.safetensors", make_pickle, ("truncated or corrupt",)),
    ("far_too_large", "huge.safetensors", make_huge_sparse, ("MiB", "not a residual")),
]


@pytest.mark.parametrize("file_name, maker, fragments", [c[1:] for c in RESIDUAL_FILE_CASES],
                         ids=[c[0] for c in RESIDUAL_FILE_CASES])
def test_bad_residual_file_is_refused(workdir, file_name, maker, fragments):
    folder = os.path.join(workdir, "models", "loras", SUB)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, file_name)
    if os.path.exists(path):
        os.unlink(path)
    maker(path)
    expect_error(LOAD, file_name, *fragments, call=lambda: run_node("PerResLoadResiduals",
                                                                    residual_name=f"{SUB}/{file_name}"))
    assert not os.path.exists(path + ".UNPICKLED"), "a pickle was unpickled"


def test_missing_residual_file_is_reported(workdir):
    expect_error(LOAD, "not in models/loras", "refresh",
                 call=lambda: run_node("PerResLoadResiduals", residual_name=f"{SUB}/gone.safetensors"))


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd"], ids=["relative", "absolute"])
def test_residual_name_outside_loras_is_not_read(workdir, name):
    expect_error(LOAD, "not in models/loras", "refresh",
                 call=lambda: run_node("PerResLoadResiduals", residual_name=name))


def test_valid_residual_file_still_loads(workdir):
    folder = os.path.join(workdir, "models", "loras", SUB)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "valid.safetensors")
    if not os.path.exists(path):
        make_valid(path)
    (loaded,) = run_node("PerResLoadResiduals", residual_name=f"{SUB}/valid.safetensors")
    assert len(loaded.layers) == 16 and loaded.concept.identifier == "sks"


# ------------------------------------------------------------------------------------------------
# 3. Images
# ------------------------------------------------------------------------------------------------

def image_folder(workdir: str, name: str, images: list[tuple[str, Image.Image]]) -> str:
    folder = os.path.join(workdir, "input", SUB, name)
    os.makedirs(folder, exist_ok=True)
    for old in os.listdir(folder):
        os.unlink(os.path.join(folder, old))
    for file_name, image in images:
        image.save(os.path.join(folder, file_name))
    return f"{SUB}/{name}"


def rgb(width: int, height: int, value: int = 128) -> Image.Image:
    return Image.new("RGB", (width, height), (value, 40, 200))


def load_images(folder: str, resolution: int = 64) -> torch.Tensor:
    return run_node("PerResLoadConceptImages", folder=folder, resolution=resolution)[0][0]  # the list's one batch


def test_no_images_in_folder(workdir):
    folder = image_folder(workdir, "empty", [])
    with open(os.path.join(workdir, "input", folder, "notes.txt"), "w") as handle:
        handle.write("not an image")
    expect_error(IMAGES, "has no images", ".png", call=lambda: load_images(folder))


def test_no_images_given_to_training(sd15):
    expect_error(TRAIN, "no reference images", "PerRes Load Concept Images",
                 call=lambda: run_node("PerResTrainResiduals", **train_inputs(sd15, torch.zeros(0, 64, 64, 3))))


def test_missing_folder(workdir):
    expect_error(IMAGES, "does not exist", "input directory",
                 call=lambda: load_images(f"{SUB}/no_such_folder"))


def test_folder_outside_input_directory(workdir):
    expect_error(IMAGES, "outside ComfyUI's input directory", "relative to it", call=lambda: load_images("../../etc"))


def test_single_image_loads_with_a_warning(workdir):
    folder = image_folder(workdir, "single", [("one.png", rgb(64, 64))])
    with LogCapture() as logs:
        batch = load_images(folder)
    assert batch.shape == (1, 64, 64, 3)
    assert any(IMAGES in m and "only one reference image" in m and "3 or more" in m
               for m in logs.messages), logs.messages


def test_mixed_sizes_are_cropped_to_one_batch(workdir):
    folder = image_folder(workdir, "mixed", [("a.png", rgb(64, 96)), ("b.jpg", rgb(200, 120)), ("c.webp", rgb(77, 65))])
    batch = load_images(folder, 64)
    assert batch.shape == (3, 64, 64, 3) and torch.isfinite(batch).all()


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16"], ids=["grayscale", "grayscale_alpha", "rgba",
                                                                       "palette", "grayscale_16bit"])
def test_grayscale_and_alpha_images_become_rgb(workdir, mode):
    base = Image.new("RGBA", (64, 64), (30, 30, 30, 255))
    base.paste((0, 0, 0, 0), (0, 0, 16, 16))  # a transparent corner
    image = base.convert(mode) if mode != "I;16" else Image.new("I;16", (64, 64), 300)
    folder = image_folder(workdir, f"mode_{mode.replace(';', '_')}", [("x.png", image)])
    batch = load_images(folder, 64)
    assert batch.shape == (1, 64, 64, 3) and torch.isfinite(batch).all()
    if mode in ("LA", "RGBA"):
        assert batch[0, 2, 2].min() > 0.95, "transparent pixels are composited over white"


def test_very_small_image_is_refused(workdir):
    folder = image_folder(workdir, "tiny", [("ok.png", rgb(64, 64)), ("tiny.png", rgb(40, 30))])
    expect_error(IMAGES, "tiny.png", "40×30", "at least 64 px", "replace it",
                 call=lambda: load_images(folder))


def test_very_small_image_given_to_training(sd15):
    expect_error(TRAIN, "32×32", "at least 64 px",
                 call=lambda: run_node("PerResTrainResiduals", **train_inputs(sd15, torch.rand(2, 32, 32, 3))))


def test_very_large_image_is_downscaled(workdir):
    folder = image_folder(workdir, "large", [("wide.png", rgb(4200, 300))])
    batch = load_images(folder, 64)
    assert batch.shape == (1, 64, 64, 3)


def test_decompression_bomb_is_refused(workdir):
    folder = image_folder(workdir, "bomb", [("bomb.png", Image.new("1", (9000, 9000)))])
    expect_error(IMAGES, "bomb.png", "9000×9000", "downscale it", call=lambda: load_images(folder))


def test_unreadable_image_file(workdir):
    folder = image_folder(workdir, "broken", [("ok.png", rgb(64, 64))])
    with open(os.path.join(workdir, "input", folder, "broken.png"), "wb") as handle:
        handle.write(b"definitely not a png")
    expect_error(IMAGES, "broken.png", "cannot be read as an image", "remove or replace it",
                 call=lambda: load_images(folder))


@pytest.fixture(scope="module")
def one_image_run(sd15):
    """Training on a single image with batch_size 3 (more than the number of images), 1 step."""
    images = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    with LogCapture() as logs:
        outputs = run_node("PerResTrainResiduals", **train_inputs(sd15, images, batch_size=3))
    return outputs, logs.messages


def test_single_image_trains(one_image_run):
    (_, trained, loss, _), _ = one_image_run
    assert len(loss["loss"]) == 1 and math.isfinite(loss["loss"][0])
    assert all(torch.isfinite(layer.up).all() for layer in trained.layers.values())


def test_batch_larger_than_images_draws_with_replacement(one_image_run):
    _, messages = one_image_run
    assert any(TRAIN in m and "1 image(s) for batch size 3" in m and "with replacement" in m
               for m in messages), messages


# ------------------------------------------------------------------------------------------------
# 4. Text
# ------------------------------------------------------------------------------------------------

TEXT_CASES = [
    ("empty_identifier", dict(identifier=""), ("identifier is empty", "such as 'sks'")),
    ("blank_identifier", dict(identifier="   "), ("identifier is empty", "such as 'sks'")),
    ("identifier_with_spaces", dict(identifier="sks toy"), ("has spaces", "one rare word")),
    ("identifier_weight_syntax", dict(identifier="(sks:1.2)"), ("prompt syntax", "give the plain word")),
    ("identifier_lora_syntax", dict(identifier="<lora:sks>"), ("prompt syntax", "give the plain word")),
    ("empty_class_word", dict(class_word=""), ("class_word is empty", "'dog'")),
    ("class_word_weight_syntax", dict(class_word="[dog]"), ("prompt syntax", "give the plain word")),
]


@pytest.mark.parametrize("overrides, fragments", [c[1:] for c in TEXT_CASES], ids=[c[0] for c in TEXT_CASES])
def test_bad_concept_words_for_training(sd15, images4, overrides, fragments):
    expect_error(TRAIN, *fragments, call=lambda: run_node("PerResTrainResiduals",
                                                          **train_inputs(sd15, images4, **overrides)))


def lag_inputs(sd15, residuals, **overrides) -> dict:
    model, clip, _ = sd15
    inputs = dict(model=model, clip=clip, residuals=residuals, prompt="a photo of a sks dog", concept_words="",
                  strength=1.0, threshold="median", quantile=0.5, start_percent=0.0, end_percent=1.0,
                  outside_window="full residual")
    inputs.update(overrides)
    return inputs


def test_lag_empty_prompt(sd15, residuals):
    expect_error(LAG, "prompt is empty", "concept words",
                 call=lambda: run_node("PerResLAGSampling", **lag_inputs(sd15, residuals, prompt="  ")))


def test_lag_concept_word_with_weight_syntax(sd15, residuals):
    expect_error(LAG, "(sks:1.5)", "prompt syntax", "plain word",
                 call=lambda: run_node("PerResLAGSampling", **lag_inputs(sd15, residuals, concept_words="(sks:1.5)")))


def test_lag_concept_words_missing_from_prompt_are_reported(sd15, residuals):
    with LogCapture() as logs:
        run_node("PerResLAGSampling", **lag_inputs(sd15, residuals, prompt="a photo of a cat on the beach"))
    assert any(m.startswith(LAG) and "'sks', 'dog' not in the prompt" in m and "Put the concept words" in m
               for m in logs.messages), logs.messages


def test_lag_prompt_longer_than_77_tokens(sd15, residuals):
    """The concept sits in the second 77-token chunk; LAG finds it there and sampling runs."""
    _, clip, _ = sd15
    filler = ", ".join(["a very detailed background"] * 20)
    prompt = f"{filler}, a photo of a sks dog"
    model, positive = run_node("PerResLAGSampling", **lag_inputs(sd15, residuals, prompt=prompt))
    concept = pack("nodes.host.lag_patch").LagPatch.of(model).concepts[0]
    assert concept.positions and min(concept.positions) >= 77, concept.positions
    assert positive[0][0].shape[1] >= 154
    negative = run_node("CLIPTextEncode", clip=clip, text="")[0]
    latent = run_node("EmptyLatentImage", width=64, height=64, batch_size=1)[0]
    samples = run_node("KSampler", model=model, seed=0, steps=1, cfg=5.0, sampler_name="euler", scheduler="normal",
                       positive=positive, negative=negative, latent_image=latent, denoise=1.0)[0]["samples"]
    assert torch.isfinite(samples).all()


# ------------------------------------------------------------------------------------------------
# 5. Numbers
# ------------------------------------------------------------------------------------------------

NUMBER_CASES = [
    ("zero_steps", dict(steps=0), ("steps must be at least 1", "150 steps")),
    ("zero_batch", dict(batch_size=0), ("batch_size must be at least 1", "paper uses 4")),
    ("negative_lr", dict(learning_rate=-1e-3), ("learning_rate must be a positive finite number", "0.001")),
    # non-finite numbers: the one check of every FLOAT input (nodes/node_guard.py), which names the default
    ("nan_lr", dict(learning_rate=float("nan")), ("learning_rate must be a finite number", "default 0.001")),
    ("inf_lr", dict(learning_rate=float("inf")), ("learning_rate must be a finite number", "default 0.001")),
    ("rank_ratio_zero", dict(rank_ratio=0.0), ("rank_ratio must be in (0, 1]", "0.05")),
    ("rank_ratio_above_one", dict(rank_ratio=1.5), ("rank_ratio must be in (0, 1]", "0.05")),
    ("rank_ratio_nan", dict(rank_ratio=float("nan")), ("rank_ratio must be a finite number", "default 0.05")),
    ("resolution_not_multiple_of_8", dict(resolution=100), ("multiple of 8", "512")),
    ("resolution_too_small", dict(resolution=32), ("at least 64", "512")),
]


@pytest.mark.parametrize("overrides, fragments", [c[1:] for c in NUMBER_CASES], ids=[c[0] for c in NUMBER_CASES])
def test_bad_training_numbers(sd15, images4, overrides, fragments):
    expect_error(TRAIN, *fragments, call=lambda: run_node("PerResTrainResiduals",
                                                          **train_inputs(sd15, images4, **overrides)))


def test_image_resolution_not_multiple_of_8(workdir):
    folder = image_folder(workdir, "resolution", [("a.png", rgb(64, 64))])
    expect_error(IMAGES, "multiple of 8", "512", call=lambda: load_images(folder, 100))


@pytest.mark.parametrize("strength", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_apply_strength_not_finite(sd15, residuals, strength):
    model = sd15[0]
    expect_error(APPLY, "strength must be a finite number", "default 1)",
                 call=lambda: run_node("PerResApplyResiduals", model=model, residuals=residuals, strength=strength))


def test_lag_window_reversed(sd15, residuals):
    expect_error(LAG, "start_percent", "after end_percent",
                 call=lambda: run_node("PerResLAGSampling", **lag_inputs(sd15, residuals, start_percent=0.8,
                                                                        end_percent=0.2)))


# ------------------------------------------------------------------------------------------------
# 6-7. Diverging and cancelled training, through ComfyUI's executor (Train → Save workflows)
# ------------------------------------------------------------------------------------------------

PROVIDED: dict = {}


class _ProvideInputs:
    """Test-only node: hands the already loaded SD1.5 model, clip, vae and images to a workflow."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's API)
        return {"required": {}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "IMAGE")
    FUNCTION = "provide"
    CATEGORY = "testing"

    def provide(self):
        return PROVIDED["model"], PROVIDED["clip"], PROVIDED["vae"], PROVIDED["images"]


@pytest.fixture
def executor(sd15, images4):
    import nodes

    PROVIDED.update(model=sd15[0], clip=sd15[1], vae=sd15[2], images=images4[:2])
    nodes.NODE_CLASS_MAPPINGS["PerResTestProvideInputs"] = _ProvideInputs
    try:
        yield prompt_executor()
    finally:
        nodes.NODE_CLASS_MAPPINGS.pop("PerResTestProvideInputs", None)
        PROVIDED.clear()


def train_save_prompt(prefix: str, **train_overrides) -> dict:
    train = dict(model=["1", 0], clip=["1", 1], vae=["1", 2], images=["1", 3], identifier="sks", class_word="dog",
                 steps=2, batch_size=2, learning_rate=1e-3, rank_ratio=0.05, resolution=64, seed=0, init="random")
    train.update(train_overrides)
    return {
        "1": {"class_type": "PerResTestProvideInputs", "inputs": {}},
        "2": {"class_type": "PerResTrainResiduals", "inputs": train},
        "3": {"class_type": "PerResSaveResiduals", "inputs": {"residuals": ["2", 1], "filename_prefix": prefix}},
    }


def execute(executor, prompt: dict) -> tuple[bool, list]:
    import execution

    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    assert valid, (error, node_errors)
    executor.execute(prompt, prompt_id, {}, outputs)
    return executor.success, executor.status_messages


def model_state(model) -> dict:
    """What must not change on the input model: its patches and hooks."""
    unet = model.model.diffusion_model
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())
    return dict(patches=sorted(model.patches), uuid=model.patches_uuid, object_patches=sorted(model.object_patches),
                wrappers=repr(model.wrappers), callbacks=repr(model.callbacks),
                options=repr(sorted(model.model_options.get("transformer_options", {}))), hooks=hooks)


@pytest.fixture
def unet_hook(sd15):
    """Installs a forward hook on the shared SD1.5 UNet for one test and always removes it."""
    handles = []

    def install(fn):
        handles.append(sd15[0].model.diffusion_model.register_forward_hook(fn))
        return handles[-1]

    yield install
    for handle in handles:
        handle.remove()


def test_diverging_run_stops_and_saves_nothing(sd15, executor, workdir, unet_hook):
    loras = os.path.join(workdir, "models", "loras")
    before_files, before_model = tree(loras), model_state(sd15[0])
    hook = unet_hook(lambda module, args, output: output * float("nan"))
    success, messages = execute(executor, train_save_prompt(f"{SUB}/diverged"))
    hook.remove()
    assert not success
    errors = [data for event, data in messages if event == "execution_error"]
    assert errors and errors[0]["node_type"] == "PerResTrainResiduals", messages
    message = errors[0]["exception_message"]
    assert message.startswith(TRAIN + ": ") and "loss became nan" in message and "nothing was saved" in message \
        and "Lower the learning rate" in message, message
    assert tree(loras) == before_files and not partial_files(loras)
    assert not any(event == "execution_success" for event, _ in messages)
    assert model_state(sd15[0]) == before_model, "the input model was left patched"


def test_residuals_that_become_nan_are_not_kept(sd15, images4, monkeypatch):
    """The loss was finite at every step, but the update made the weights NaN: still refused."""
    original_step = torch.optim.AdamW.step

    def poisoned_step(self, *args, **kwargs):
        result = original_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    expect_error(TRAIN, "NaN or Inf after training", "nothing was saved", "Lower the learning rate",
                 call=lambda: run_node("PerResTrainResiduals", **train_inputs(sd15, images4)))


def test_cancel_stops_within_one_step_and_leaves_nothing(sd15, executor, workdir, unet_hook):
    import comfy.model_management

    loras = os.path.join(workdir, "models", "loras")
    model = sd15[0]
    before_files, before_model = tree(loras), model_state(model)
    before_grad = {name: p.requires_grad for name, p in model.model.diffusion_model.named_parameters()}
    forwards = []

    def interrupt_during_first_step(module, args, output):
        forwards.append(1)
        comfy.model_management.interrupt_current_processing(True)  # what the UI's Cancel button does

    hook = unet_hook(interrupt_during_first_step)
    try:
        success, messages = execute(executor, train_save_prompt(f"{SUB}/cancelled", steps=20))
    finally:
        comfy.model_management.interrupt_current_processing(False)
        hook.remove()
    assert not success
    assert any(event == "execution_interrupted" for event, _ in messages), messages
    assert len(forwards) == 1, f"training ran {len(forwards)} UNet passes after the cancel"
    assert tree(loras) == before_files, "a file was written"
    assert not partial_files(workdir)
    assert model_state(model) == before_model, "the input model was left patched"
    after_grad = {name: p.requires_grad for name, p in model.model.diffusion_model.named_parameters()}
    assert after_grad == before_grad

    # the next prompt runs normally (same executor, as in the server)
    forwards.clear()
    success, messages = execute(executor, train_save_prompt(f"{SUB}/after_cancel", steps=1))
    assert success, [data.get("exception_message") for event, data in messages if event == "execution_error"]
    new_files = tree(loras) - before_files
    assert len(new_files) == 1 and next(iter(new_files)).startswith(f"{SUB}/after_cancel_"), new_files
    loaded = run_node("PerResLoadResiduals", residual_name=next(iter(new_files)).replace(os.sep, "/"))[0]
    assert len(loaded.layers) == 16
    assert model_state(model) == before_model


# ------------------------------------------------------------------------------------------------
# 8. Saving
# ------------------------------------------------------------------------------------------------

PREFIX_CASES = [
    ("dotdot", "..", ("'..'",)),
    ("dotdot_escape", "../escape", ("'..'", "no '..'")),
    ("dotdot_inside", "perres/../../escape", ("'..'", "no '..'")),
    ("absolute_posix", "/tmp/perres_escape", ("absolute path", "relative to models/loras")),
    ("drive_letter_backslash", "C:\\Users\\escape", ("absolute path", "relative to models/loras")),
    ("drive_letter_relative", "C:escape", ("absolute path", "relative to models/loras")),
    ("unc_path", "\\\\server\\share\\escape", ("absolute path", "relative to models/loras")),
    ("home_tilde", "~/escape", ("'~'", "letters, digits")),
    ("nul_byte", "perres/bad\x00name", ("letters, digits",)),
    ("empty", "   ", ("filename_prefix is empty", "perres/my_dog")),
]


@pytest.mark.parametrize("prefix, fragments", [c[1:] for c in PREFIX_CASES], ids=[c[0] for c in PREFIX_CASES])
def test_unsafe_filename_prefix_is_refused(workdir, residuals, prefix, fragments, tmp_path):
    watched = [workdir, str(tmp_path)]
    before = {root: tree(root) for root in watched}
    expect_error(SAVE, "filename_prefix", *fragments,
                 call=lambda: run_node("PerResSaveResiduals", residuals=residuals, filename_prefix=prefix))
    assert {root: tree(root) for root in watched} == before
    assert not os.path.exists("/tmp/perres_escape_00001.safetensors")


def test_existing_file_is_never_overwritten(workdir, residuals):
    folder = os.path.join(workdir, "models", "loras", SUB, "keep")
    os.makedirs(folder, exist_ok=True)
    first = os.path.join(folder, "mine_00001.safetensors")
    with open(first, "wb") as handle:
        handle.write(b"the user's own file")
    (relative,) = run_node("PerResSaveResiduals", residuals=residuals, filename_prefix=f"{SUB}/keep/mine")
    assert relative == f"{SUB}/keep/mine_00002.safetensors"
    with open(first, "rb") as handle:
        assert handle.read() == b"the user's own file"
    assert not partial_files(folder)


def test_saving_over_an_existing_name_is_refused(workdir, residuals):
    residual_file = pack("perres_core.residual_file")
    folder = os.path.join(workdir, "models", "loras", SUB, "race")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "taken.safetensors")
    with open(path, "wb") as handle:
        handle.write(b"original")
    with pytest.raises(perres_error(), match="already exists and is never overwritten"):
        residual_file.save_residual_file(residuals, path, "test")
    with open(path, "rb") as handle:
        assert handle.read() == b"original"
    assert not partial_files(folder)


@pytest.mark.parametrize("where", ["fsync", "write"])
def test_failed_write_leaves_no_file(workdir, residuals, monkeypatch, where):
    import errno

    folder = os.path.join(workdir, "models", "loras", SUB, f"crash_{where}")
    os.makedirs(folder, exist_ok=True)
    before = tree(folder)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "fsync":
        monkeypatch.setattr(os, "fsync", no_space)
    else:
        real_fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: _FailingHandle(fd) if mode == "wb"
                            else real_fdopen(fd, mode, *a, **k))
    expect_error(SAVE, "could not write", "No space left", "free disk space",
                 call=lambda: run_node("PerResSaveResiduals", residuals=residuals,
                                       filename_prefix=f"{SUB}/crash_{where}/concept"))
    assert tree(folder) == before, "a half-written or temporary file was left behind"


class _FailingHandle:
    """A file handle that writes half the data and then fails, like a full disk."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)
        return False

    def write(self, data: bytes) -> int:
        import errno

        os.write(self.fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self.fd


CRASH_SCRIPT = r"""
import importlib.util, os, sys
root, target = sys.argv[1], sys.argv[2]
init = os.path.join(root, "perres_core", "__init__.py")
spec = importlib.util.spec_from_file_location("perres_core", init, submodule_search_locations=[os.path.dirname(init)])
module = importlib.util.module_from_spec(spec); sys.modules["perres_core"] = module; spec.loader.exec_module(module)
from perres_core.residual import ResidualSet
from perres_core.residual_file import save_residual_file
from perres_core.families import SD1
residuals = ResidualSet.create(SD1.layer_shapes()); residuals.initialize("random", 0)
os.fsync = lambda fd: os._exit(3)   # the process dies after the data is written, before it is published
save_residual_file(residuals, target, "crash-test")
"""


def test_process_crash_mid_write_leaves_nothing_under_the_final_name(tmp_path):
    from comfy_host import PACK_DIR

    target = tmp_path / "loras" / "concept_00001.safetensors"
    result = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, PACK_DIR, str(target)], capture_output=True,
                            timeout=120)
    assert result.returncode == 3, result.stderr.decode()[-2000:]
    assert not target.exists(), "a half-written file got its final name"
    leftovers = os.listdir(tmp_path / "loras")
    assert all(name.startswith(".perres-") and name.endswith(".partial") for name in leftovers), leftovers
