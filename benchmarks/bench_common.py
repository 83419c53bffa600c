"""Shared plumbing of the PerRes benchmarks: the real ComfyUI host in-process, timers, memory.

The host is started exactly as the tests start it (tests/comfy_host.py): ComfyUI's root goes on
sys.path and the pack is loaded with nodes.load_custom_node. The pack root itself is never put on
sys.path, because the pack's `nodes/` folder would shadow ComfyUI's `nodes` module.
"""
from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator, Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
TESTS_DIR = os.path.join(os.path.dirname(BENCH_DIR), "tests")
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)  # the tests' helper modules (comfy_host, sd15_checkpoint), not the pack

from comfy_host import PACK_DIR, compute_in_bf16, find_comfyui, pack, run_node, start_host  # noqa: E402,F401

CHECKPOINT_NAME = "sd15_random_arch.safetensors"  # sd15_checkpoint.CHECKPOINT_NAME; that module imports torch


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


_STARTED: dict[str, str] = {}  # the workdir of the host this process started (it starts once)


def start(device: str, precision: str = "fp32", attention: str = "default", dynamic_vram: str = "off") -> str:
    """Start ComfyUI in-process (CPU, or CUDA with --device cuda) with the pack loaded; returns the workdir.

    precision "fp32" forces fp32 UNet, VAE and text encoder weights on every device (the default, so the
    CPU benchmarks compare like with like); "fp16" is ComfyUI's --fp16-unet, what an SD1.5 user's GPU runs.
    attention "pytorch" is ComfyUI's --use-pytorch-cross-attention (torch's fused scaled_dot_product_attention,
    which ComfyUI picks by itself on NVIDIA GPUs); "default" leaves ComfyUI's choice for the device (on the
    CPU: sub-quadratic attention, which keeps the N×N attention scores for the backward pass).
    dynamic_vram "on" enables ComfyUI's dynamic VRAM (comfy-aimdo, ModelPatcherDynamic) the way its main.py
    does by default on NVIDIA GPUs (0.33.0); dynamic_vram_state() says what was used.
    """
    if "workdir" in _STARTED:  # a second model in the same run: same host, same settings
        return _STARTED["workdir"]
    root = find_comfyui()
    if root is None:
        raise SystemExit("No ComfyUI found: set COMFYUI_PATH to a ComfyUI checkout (0.3.64 was used here).")
    if root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args
    if precision == "fp32":
        args.fp32_unet = True
        args.fp32_vae = True
        args.fp32_text_enc = True
    elif precision == "fp16":
        args.fp16_unet = True
    elif precision == "bf16":
        args.bf16_unet = True   # what the SDXL tests load: AMX-BF16 on this CPU, half the memory of fp32
    else:
        raise SystemExit(f"unknown precision {precision!r}; use fp32, fp16 or bf16")
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
    say(f"ComfyUI {comfy_version(root)} at {root}; torch device {mm.get_torch_device()}; "
        f"torch {torch_version()}, {torch_threads()} CPU threads; dynamic VRAM {dynamic_vram_state()}; "
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


def say_settings(opts, compares: str) -> None:
    """The lines every benchmark's summary starts with: the host, every option it ran with, what it compares."""
    say(f"  host: ComfyUI {comfy_version('')}, torch {torch_version()}, {torch_threads()} threads, "
        f"dynamic VRAM {dynamic_vram_state()}")
    say("  settings: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(opts).items())))
    say(f"  compares: {compares}")


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


def torch_version() -> str:
    import torch
    return torch.__version__


def torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def checkpoint(workdir: str) -> str:
    """The random-weight SD1.5-architecture checkpoint of the tests (built once, cached), linked into workdir."""
    from sd15_checkpoint import link_sd15_checkpoint

    link_sd15_checkpoint(workdir, CHECKPOINT_NAME)
    return CHECKPOINT_NAME


def sdxl_checkpoint(workdir: str) -> str:
    """The tests' random-weight SDXL-architecture checkpoint (built once, 7 GB, cached), linked into workdir."""
    from sdxl_checkpoint import CHECKPOINT_NAME as SDXL_NAME, link_sdxl_checkpoint

    link_sdxl_checkpoint(workdir, SDXL_NAME)
    return SDXL_NAME


def pack_module(relative: str):
    """A module of the loaded pack, e.g. pack_module('nodes.host.residual_hooks') (the pack's own, not ComfyUI's)."""
    return pack(relative)


def cuda_active() -> bool:
    """True once this process uses a CUDA device (the benchmarks never initialise CUDA on the CPU)."""
    import torch
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def sync() -> None:
    import torch
    if cuda_active():
        torch.cuda.synchronize()


class StepClock:
    """Wall-clock and process-CPU timestamps of events (optimizer or sampler steps).

    CPU time is reported next to wall time because it is far less sensitive to other processes
    competing for the same cores. With one torch thread it is the CPU time of the calling thread
    (all CPU ops, forward and backward, run there), else of the whole process.
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []

    def tick(self, *_args, **_kwargs) -> None:
        sync()
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(cpu_time())

    def reset(self) -> None:
        self.stamps.clear()
        self.cpu_stamps.clear()

    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]

    def cpu_durations(self) -> list[float]:
        return [b - a for a, b in zip(self.cpu_stamps, self.cpu_stamps[1:])]


@contextlib.contextmanager
def optimizer_steps(clock: StepClock) -> Iterator[None]:
    """Tick `clock` after every torch optimizer step in the process (PerRes, the bound and the stock node alike)."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    handle = register_optimizer_step_post_hook(clock.tick)
    try:
        yield
    finally:
        handle.remove()


class Segments:
    """Where a training step's time goes: marks at UNet forward start/end and optimizer step start/end.

    Segment names: 'glue' (optimizer step end -> next UNet forward: batch drawing, noise, host code),
    'forward', 'loss+backward' (forward end -> optimizer step start), 'optimizer', and 'between UNet
    calls' when one step runs the UNet more than once. Only whole steps after the first optimizer
    step are counted, so setup and the warm-up step are excluded.
    """

    NAMES = {("opt_end", "fwd_start"): "glue", ("fwd_start", "fwd_end"): "forward",
             ("fwd_end", "opt_start"): "loss+backward", ("opt_start", "opt_end"): "optimizer",
             ("fwd_end", "fwd_start"): "between UNet calls"}

    def __init__(self) -> None:
        self.marks: list[tuple[str, float, float]] = []

    def mark(self, label: str) -> None:
        sync()
        self.marks.append((label, time.perf_counter(), cpu_time()))

    def reset(self) -> None:
        self.marks.clear()

    def per_step(self) -> dict[str, tuple[float, float]]:
        """Segment -> (wall, cpu) seconds per step."""
        ends = [i for i, (label, _, _) in enumerate(self.marks) if label == "opt_end"]
        if len(ends) < 2:
            return {}
        marks = self.marks[ends[0]:ends[-1] + 1]
        totals: dict[str, list[float]] = {}
        for (a, wa, ca), (b, wb, cb) in zip(marks, marks[1:]):
            name = self.NAMES.get((a, b), f"{a}->{b}")
            acc = totals.setdefault(name, [0.0, 0.0])
            acc[0] += wb - wa
            acc[1] += cb - ca
        steps = len(ends) - 1
        return {name: (w / steps, c / steps) for name, (w, c) in totals.items()}


@contextlib.contextmanager
def segment_marks(segments: Segments, unet) -> Iterator[None]:
    """Mark UNet forward start/end (module hooks on `unet`) and every torch optimizer step start/end."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    handles = [
        unet.register_forward_pre_hook(lambda *a: segments.mark("fwd_start")),
        unet.register_forward_hook(lambda *a: segments.mark("fwd_end")),
        register_optimizer_step_pre_hook(lambda *a: segments.mark("opt_start")),
        register_optimizer_step_post_hook(lambda *a: segments.mark("opt_end")),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def progress_steps(clock: StepClock) -> Iterator[None]:
    """Tick `clock` on every comfy.utils.ProgressBar update (KSampler calls it once per sampling step)."""
    import comfy.utils
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: clock.tick())
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)


def cpu_time() -> float:
    """CPU seconds: of this thread when torch runs single-threaded, else of the whole process."""
    import torch
    return time.thread_time() if torch.get_num_threads() == 1 else time.process_time()


def rss_bytes() -> int:
    import psutil
    return psutil.Process().memory_info().rss


class PeakMemory:
    """Peak resident memory (sampled every 20 ms) of a phase on the CPU, or peak allocated CUDA memory."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.start_rss = 0
        self.peak_rss = 0
        self.cuda_peak: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, rss_bytes())

    def __enter__(self) -> "PeakMemory":
        import torch
        if cuda_active():
            torch.cuda.reset_peak_memory_stats()
        self.start_rss = self.peak_rss = rss_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, rss_bytes())
        if cuda_active():
            self.cuda_peak = torch.cuda.max_memory_allocated()

    def describe(self) -> str:
        gib = 1024 ** 3
        text = f"peak RSS {self.peak_rss / gib:.2f} GiB (+{(self.peak_rss - self.start_rss) / gib:.2f} GiB in phase)"
        if self.cuda_peak is not None:
            text += f", peak CUDA allocated {self.cuda_peak / gib:.2f} GiB"
        return text


class TrainingPeak:
    """Peak memory of the training steps alone, above what was in use when the UNet first ran.

    The baseline is taken at the first UNet forward of the phase, so the loaded model, the latents and
    everything before (the VAE encoding a training node does first) are excluded: what remains is the
    memory the steps themselves add (activations kept for backward, gradients, optimizer state). On CUDA
    it is torch's allocator peak; on the CPU the resident set size, sampled every 5 ms.
    """

    def __init__(self, unet) -> None:
        self.unet = unet
        self.baseline: Optional[int] = None
        self.cuda_total_peak: Optional[int] = None
        self._rss = PeakMemory(interval=0.005)
        self._handle = None

    def _on_first_forward(self, *_args) -> None:
        import torch
        if self.baseline is not None:
            return
        if cuda_active():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            self.baseline = rss_bytes()
            self._rss.peak_rss = self.baseline

    def __enter__(self) -> "TrainingPeak":
        self._handle = self.unet.register_forward_pre_hook(self._on_first_forward)
        self._rss.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        import torch
        self._handle.remove()
        self._rss.__exit__(*exc)
        if cuda_active():
            self.cuda_total_peak = torch.cuda.max_memory_allocated()

    @property
    def extra_bytes(self) -> int:
        if self.baseline is None:
            return 0
        peak = self.cuda_total_peak if self.cuda_total_peak is not None else self._rss.peak_rss
        return max(0, peak - self.baseline)


def gib(num_bytes: Optional[float]) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 1024 ** 3:.2f} GiB"


def process_peak_rss() -> str:
    """ru_maxrss of the whole process (kB on Linux)."""
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2:.2f} GiB"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"median {median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f}, n={len(values)})"


def verdict(ratio: float, target: float) -> str:
    return "OK" if ratio <= target else "OVER TARGET"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def set_threads(threads: int) -> None:
    """torch.set_num_threads(threads) unless 0; on a machine shared with other jobs 1 gives steadier numbers."""
    import torch
    if threads:
        torch.set_num_threads(threads)


def load_note() -> str:
    """The 1-minute load average against the core count, to flag a busy machine in the output."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "load average unknown"
    cores = os.cpu_count() or 1
    busy = " (BUSY: other processes compete for the cores; trust the CPU-time ratios more)" if load > cores + 0.5 else ""
    return f"load average {load:.2f} on {cores} cores{busy}"


def load_sd15(device: str, threads: int, precision: str = "fp32", attention: str = "default",
              dynamic_vram: str = "off"):
    """Start the host, set torch's threads and load the cached random SD1.5 checkpoint: (model, clip, vae)."""
    workdir = start(device, precision, attention, dynamic_vram)
    set_threads(threads)
    return run_node("CheckpointLoaderSimple", ckpt_name=checkpoint(workdir))


# The random diffusion transformers (tests/dit_models.py) by benchmark family name, with the weight_dtype Load
# Diffusion Model gets: Anima as released (bf16 with --precision bf16), Krea 2 in fp8 as users fit it.
DIT_FAMILIES = {"anima": ("Anima", "default"), "krea2": ("Krea2", "fp8_e4m3fn")}
FAMILY_CHOICES = ("sd15", "sdxl", *DIT_FAMILIES)


def load_model(family: str, device: str, threads: int, precision: str, attention: str = "default",
               dynamic_vram: str = "off", krea2_blocks: int = 2):
    """(model, clip, vae) of the tests' random model of `family` ("sd15", "sdxl", "anima" or "krea2"; the DiTs
    through Load Diffusion Model, Load CLIP and Load VAE)."""
    if family == "sd15":
        return load_sd15(device, threads, precision, attention, dynamic_vram)
    workdir = start(device, precision, attention, dynamic_vram)
    set_threads(threads)
    if family in DIT_FAMILIES:
        from dit_models import DIT_TEST_MODELS, krea2_with_blocks, stock_loaded

        config_name, weight_dtype = DIT_FAMILIES[family]
        spec = next(m for m in DIT_TEST_MODELS if m.config_name == config_name)
        if config_name == "Krea2":
            spec = krea2_with_blocks(krea2_blocks)  # all 28 on a GPU (gpu_check); the tests' 2 on this CPU
        loaded = stock_loaded(spec, workdir, weight_dtype)
    else:
        loaded = run_node("CheckpointLoaderSimple", ckpt_name=sdxl_checkpoint(workdir))
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
