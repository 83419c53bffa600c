"""Shared plumbing of the benchmarks: the real ComfyUI host in-process, as the tests start it (tests/comfy_host.py,
benchmarks/README.md), its models and the nodes they run; timing and the records are harness.py's."""
from __future__ import annotations

import os
import sys
import tempfile

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
TESTS_DIR = os.path.join(os.path.dirname(BENCH_DIR), "tests")
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)  # the tests' helper modules (comfy_host, sd15_checkpoint), not the pack

from comfy_host import PACK_DIR, compute_in_bf16, find_comfyui, pack, run_node, start_host  # noqa: E402,F401
from harness import say  # noqa: E402

CHECKPOINT_NAME = "sd15_random_arch.safetensors"  # sd15_checkpoint.CHECKPOINT_NAME; that module imports torch
_STARTED: dict[str, str] = {}  # the workdir of the host this process started (it starts once)


def start(device: str, precision: str = "fp32", attention: str = "default", dynamic_vram: str = "off") -> str:
    """Start ComfyUI in-process with the pack loaded, once per process; returns the workdir. precision fp32 forces
    fp32 weights everywhere, fp16/bf16 are --fp16-unet/--bf16-unet; attention "pytorch" is
    --use-pytorch-cross-attention; dynamic_vram "on" enables comfy-aimdo as 0.33.0's main.py does on NVIDIA."""
    if "workdir" in _STARTED:  # a second model in the same run: same host, same settings
        return _STARTED["workdir"]
    root = find_comfyui()
    if root is None:
        raise SystemExit("No ComfyUI found: set COMFYUI_PATH to a ComfyUI checkout (0.3.64 was used here).")
    if root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args
    # bf16 is what the SDXL tests load: AMX-BF16 on this CPU, half the memory of fp32
    flags = {"fp32": ("fp32_unet", "fp32_vae", "fp32_text_enc"), "fp16": ("fp16_unet",), "bf16": ("bf16_unet",)}
    if precision not in flags:
        raise SystemExit(f"unknown precision {precision!r}; use fp32, fp16 or bf16")
    for flag in flags[precision]:
        setattr(args, flag, True)
    if attention == "pytorch":
        args.use_pytorch_cross_attention = True
    if device != "cpu":
        # comfy.model_management fixes its device when it is first imported; importing it here, before
        # start_host() sets args.cpu = True for the tests, keeps the accelerator.
        args.cpu = False
        aimdo = _aimdo_control() if dynamic_vram == "on" else None
        import comfy.model_management  # noqa: F401
        _STARTED["dynamic_vram"] = _enable_dynamic_vram(aimdo) if aimdo else \
            ("off (asked)" if dynamic_vram != "on" else "off (this ComfyUI has no comfy-aimdo)")
    else:
        _STARTED["dynamic_vram"] = "off (CPU: ComfyUI enables it on NVIDIA and recent ROCm only)"
    workdir = tempfile.mkdtemp(prefix="perres-bench-")
    start_host(root, workdir)
    _STARTED["workdir"] = workdir
    import comfy.model_management as mm
    import torch
    say(f"ComfyUI {comfy_version(root)} at {root}; torch device {mm.get_torch_device()}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; dynamic VRAM {dynamic_vram_state()}; "
        f"pack {PACK_DIR}")
    return workdir


def dynamic_vram_state() -> str:
    """'on', or 'off (why)': whether this process's host runs ComfyUI's dynamic VRAM."""
    return _STARTED.get("dynamic_vram", "off (no host in this process)")


def _aimdo_control():
    """comfy_aimdo.control initialised as ComfyUI's main.py does before comfy.model_management is imported,
    or None where the host predates comfy-aimdo (0.3.64 has none)."""
    import importlib.util
    from comfy import cli_args
    if importlib.util.find_spec("comfy_aimdo") is None or not hasattr(cli_args, "enables_dynamic_vram"):
        return None
    import comfy_aimdo.control
    try:
        comfy_aimdo.control.init(simple_vram_headroom=None, nvml_pressure=True)
    except TypeError:  # comfy-aimdo 0.4.10 and older take fewer arguments; main.py falls back the same way
        comfy_aimdo.control.init()
    return comfy_aimdo.control


def _enable_dynamic_vram(control) -> str:
    """main.py's second half: aimdo on every torch device, then the dynamic ModelPatcher as the host's default."""
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher
    from comfy.cli_args import args
    if not mm.is_nvidia():
        return "off (not an NVIDIA device)"
    headroom = int(getattr(args, "vram_headroom", 0) * 1024 ** 3)
    try:
        ready = control.init_devices((d.index, headroom) for d in mm.get_all_torch_devices())
    except TypeError:
        ready = control.init_devices(d.index for d in mm.get_all_torch_devices())
    if not ready:
        return "off (comfy-aimdo could not initialise the device)"
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return "on"


def comfy_version(root: str = "") -> str:
    """The version of the host in this process, else of the ComfyUI at `root` (or the one find_comfyui finds)."""
    try:
        import comfyui_version
        return comfyui_version.__version__
    except Exception:
        pass
    import re
    try:
        with open(os.path.join(root or find_comfyui() or "", "comfyui_version.py"), encoding="utf-8") as handle:
            found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", handle.read())
        return found.group(1) if found else "?"
    except OSError:
        return "?"


pack_module = pack  # a module of the loaded pack, e.g. pack_module("nodes.host.lag_patch"), not ComfyUI's


def set_threads(threads: int) -> None:
    """torch.set_num_threads(threads) unless 0; on a machine shared with other jobs 1 gives steadier numbers."""
    import torch
    if threads:
        torch.set_num_threads(threads)


# The random diffusion transformers (tests/dit_models.py) by benchmark family name, with the weight_dtype Load
# Diffusion Model gets: Anima as released (bf16 with --precision bf16), Krea 2 in fp8 as users fit it.
DIT_FAMILIES = {"anima": ("Anima", "default"), "krea2": ("Krea2", "fp8_e4m3fn")}
FAMILY_CHOICES = ("sd15", "sdxl", *DIT_FAMILIES)


def load_model(family: str, device: str, threads: int, precision: str = "fp32", attention: str = "default",
               dynamic_vram: str = "off", krea2_blocks: int = 2):
    """Start the host, set torch's threads and load the tests' random model of `family` (cached, built once):
    (model, clip, vae); the DiTs through Load Diffusion Model, Load CLIP and Load VAE."""
    workdir = start(device, precision, attention, dynamic_vram)
    set_threads(threads)
    if family == "sd15":
        from sd15_checkpoint import link_sd15_checkpoint

        link_sd15_checkpoint(workdir, CHECKPOINT_NAME)  # shared with the tests
        return run_node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT_NAME)
    if family in DIT_FAMILIES:
        from dit_models import DIT_TEST_MODELS, krea2_with_blocks, stock_loaded

        config_name, weight_dtype = DIT_FAMILIES[family]
        spec = next(m for m in DIT_TEST_MODELS if m.config_name == config_name)
        if config_name == "Krea2":
            spec = krea2_with_blocks(krea2_blocks)  # all 28 on a GPU (gpu_check); the tests' 2 on this CPU
        loaded = stock_loaded(spec, workdir, weight_dtype)
    else:
        from sdxl_checkpoint import CHECKPOINT_NAME as SDXL_NAME, link_sdxl_checkpoint

        link_sdxl_checkpoint(workdir, SDXL_NAME)  # 7 GB, built once and cached
        loaded = run_node("CheckpointLoaderSimple", ckpt_name=SDXL_NAME)
    if device == "cpu" and precision == "bf16":
        compute_in_bf16(loaded[0])  # as the SDXL tests run it: bf16 matmuls, no fp32 weight copies
    return loaded


def image_latents(model, vae, images):
    """One latent per image, as PerRes Train Residuals encodes them, in the shape the model's LATENTs have (a
    video VAE's single frame kept for the DiTs: what TrainLoraNode reads too)."""
    import torch

    with torch.inference_mode():
        latents = pack("nodes.host.training").encode_images(vae, images, model)
    return latents.unsqueeze(2) if model.model.latent_format.latent_dimensions == 3 else latents


def stock_trainer_inputs(overrides: dict) -> dict:
    """ComfyUI's TrainLoraNode inputs: the host's own defaults for everything not overridden. Its inputs
    differ by host (0.33.0 added quantized_backward, checkpoint_depth, offloading, bucket_mode, bypass_mode),
    so the benchmarks never spell out the full list."""
    import nodes
    from comfy_api.internal import _ComfyNodeInternal

    cls = nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"]
    info = cls.GET_NODE_INFO_V1() if issubclass(cls, _ComfyNodeInternal) else {"input": cls.INPUT_TYPES()}
    values = {}
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if "default" in options:
                values[name] = options["default"]
            elif isinstance(spec[0], list) and spec[0]:
                values[name] = spec[0][-1] if "[None]" in spec[0] else spec[0][0]
    unknown = set(overrides) - set(values) - {"model", "latents", "positive"}
    if unknown:
        raise SystemExit(f"TrainLoraNode of this ComfyUI has no input(s) {sorted(unknown)}")
    values.update(overrides)
    return values


def run_stock_trainer(values: dict):
    """One TrainLoraNode call with `values` (stock_trainer_inputs), as the host's executor would make it."""
    import nodes
    import torch

    cls = nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"]
    with torch.inference_mode():
        if getattr(cls, "define_schema", None) and cls.define_schema().is_input_list:
            return cls.execute(**{k: [v] for k, v in values.items()})  # newer hosts: every input is a list
        if hasattr(cls, "execute") and hasattr(cls, "define_schema"):
            return cls.execute(**values)
        return getattr(cls(), cls.FUNCTION)(**values)


def make_images(batch: int, resolution: int):
    """`batch` seeded random images with a red square in the middle (the training benchmarks' concept)."""
    import torch
    g = torch.Generator().manual_seed(1)
    images = torch.rand(batch, resolution, resolution, 3, generator=g) * 0.3
    lo, hi = resolution // 4, 3 * resolution // 4
    images[:, lo:hi, lo:hi, 0] = 0.9
    return images


def train_perres(model, clip, vae, images, steps: int, batch: int, resolution: int, seed: int = 0,
                 node=None, **inputs):
    """One PerRes Train Residuals call on the benchmarks' concept ("sks dog"); `inputs` override the node's
    defaults (gradient_checkpointing, preview_every, ...); `node` replaces run_node (bench_preview's node id)."""
    return (node or (lambda **kw: run_node("PerResTrainResiduals", **kw)))(
        model=model, clip=clip, vae=vae, images=images, identifier="sks", class_word="dog", steps=steps,
        batch_size=batch, learning_rate=1e-3, rank_ratio=0.05, resolution=resolution, seed=seed, init="random",
        **inputs)



def encode(clip, text: str):
    """CLIPTextEncode's conditioning of `text`."""
    return run_node("CLIPTextEncode", clip=clip, text=text)[0]


def lag_sampling(model, clip, prompt: str, concept_words: str = "", **concepts):
    """(model, positive) of PerRes LAG Sampling with median masks over the whole schedule; `concepts` are
    residuals= and/or extra_concepts= (PerRes LAG LoRA's)."""
    return run_node("PerResLAGSampling", model=model, clip=clip, prompt=prompt, concept_words=concept_words,
                    strength=1.0, threshold="median", quantile=0.5, start_percent=0.0, end_percent=1.0,
                    outside_window="full residual", **concepts)[:2]


def ksample(model, positive, negative, latent, steps: int, cfg: float, seed: int, sampler: str = "euler",
            scheduler: str = "normal"):
    """The stock KSampler's samples (full denoise)."""
    return run_node("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
                    scheduler=scheduler, positive=positive, negative=negative, latent_image=latent,
                    denoise=1.0)[0]["samples"]
