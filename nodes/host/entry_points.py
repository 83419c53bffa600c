"""Every ComfyUI entry point PerRes relies on, in one list, checked once when ComfyUI loads the pack.

Below comfy_api, ComfyUI has no stable API: PerRes also calls into comfy.lora, comfy.patcher_extension,
ModelPatcher, latent_preview and more, and a newer host may move one of them. A moved entry point must not
make the pack vanish behind an ImportError, nor end a run in a traceback: the host's modules are imported
here and only here, each guarded, so the nodes always register; the console says once what is missing, and
every node that needs it refuses to run with the same message (nodes/node_guard.py). The nodes that do not
need it keep working.

comfy_api.latest itself (the V3 node API) is the one thing PerRes cannot register without; the pack's
__init__.py reports its absence. Which of these entry points changed in newer hosts is recorded in
docs/host-compatibility.md.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ...perres_core.errors import PerResError

log = logging.getLogger("perres")

# The ComfyUI versions the tests run on (.ci/comfyui-hosts; a test keeps the two in step). Newer hosts are
# expected to work; this check names what broke when one does not.
TESTED_HOSTS = ("0.3.64", "0.33.0")

TRAIN = "PerResTrainResiduals"
SUGGEST = "PerResSuggestClassWord"
APPLY = "PerResApplyResiduals"
LAG = "PerResLAGSampling"
LAG_LORA = "PerResLAGLoRA"
PREVIEW = "PerResLAGMaskPreview"
LOAD = "PerResLoadResiduals"
SAVE = "PerResSaveResiduals"
IMAGES = "PerResLoadConceptImages"
# Nodes that run the model through ComfyUI: they need the model-facing entry points.
MODEL_NODES = (TRAIN, SUGGEST, APPLY, LAG)

# The host modules PerRes imports (here only, each guarded).
HOST_MODULES = ("comfy.lora", "comfy.lora_convert", "comfy.weight_adapter", "comfy.utils", "comfy.model_management",
                "comfy.model_sampling", "comfy.model_patcher", "comfy.model_base", "comfy.patcher_extension",
                "comfy.sd", "comfy.ldm.modules.diffusionmodules.openaimodel",
                "comfy.ldm.flux.math", "latent_preview", "folder_paths")


@dataclass(frozen=True)
class EntryPoint:
    """A module attribute PerRes calls or reads: `module`, then the dotted `attribute` inside it."""

    module: str
    attribute: str
    needed_by: tuple[str, ...]  # node ids that cannot run without it; () = only a convenience is lost
    parameters: tuple[str, ...] = ()  # parameter names PerRes passes, which the callable must still take

    @property
    def name(self) -> str:
        call = f"({', '.join(self.parameters)})" if self.parameters else ""
        return f"{self.module}.{self.attribute}{call}"


ENTRY_POINTS: tuple[EntryPoint, ...] = (
    # LoRA machinery: residuals and LoRAs go through the host's own key map and weight adapters.
    EntryPoint("comfy.lora", "model_lora_keys_unet", (TRAIN, APPLY, LAG), ("model", "key_map")),
    EntryPoint("comfy.lora", "load_lora", (TRAIN, APPLY, LAG), ("lora", "to_load", "log_missing")),
    EntryPoint("comfy.lora", "calculate_weight", (LAG,), ("patches", "weight", "key")),
    EntryPoint("comfy.lora_convert", "convert_lora", (LAG,), ("sd",)),
    EntryPoint("comfy.weight_adapter", "LoRAAdapter", (LAG,)),
    EntryPoint("comfy.utils", "load_torch_file", (LAG,), ("ckpt", "safe_load")),
    # The patcher: clones, weight patches and wrappers (never the incoming MODEL itself).
    EntryPoint("comfy.model_patcher", "ModelPatcher.clone", MODEL_NODES),
    EntryPoint("comfy.model_patcher", "ModelPatcher.add_patches", (TRAIN, APPLY), ("patches", "strength_patch")),
    EntryPoint("comfy.model_patcher", "ModelPatcher.get_model_object", (TRAIN, SUGGEST, LAG), ("name",)),
    EntryPoint("comfy.model_patcher", "ModelPatcher.add_wrapper_with_key", (LAG,), ("wrapper_type", "key", "wrapper")),
    EntryPoint("comfy.model_patcher", "ModelPatcher.get_wrappers", (LAG,), ("wrapper_type", "key")),
    EntryPoint("comfy.patcher_extension", "WrappersMP.DIFFUSION_MODEL", (LAG,)),
    EntryPoint("comfy.patcher_extension", "WrappersMP.OUTER_SAMPLE", (LAG,)),
    # What LAG's DIFFUSION_MODEL wrapper receives: the UNet's _forward arguments.
    EntryPoint("comfy.ldm.modules.diffusionmodules.openaimodel", "UNetModel._forward", (LAG,),
               ("x", "timesteps", "context", "y", "control", "transformer_options")),
    # RoPE as the host applies it to a DiT's queries and keys (Krea 2): LAG's concept maps read them
    EntryPoint("comfy.ldm.flux.math", "apply_rope1", (LAG,), ("x", "freqs_cis")),
    # The model: schedule, latents, SDXL's size vector, memory estimate.
    EntryPoint("comfy.model_sampling", "ModelSamplingDiscrete.percent_to_sigma", (LAG,), ("percent",)),
    EntryPoint("comfy.model_sampling", "EPS.calculate_input", (TRAIN, SUGGEST), ("sigma", "noise")),
    EntryPoint("comfy.model_sampling", "EPS.calculate_denoised", (TRAIN, SUGGEST),
               ("sigma", "model_output", "model_input")),
    EntryPoint("comfy.model_sampling", "V_PREDICTION.calculate_denoised", (TRAIN, SUGGEST),
               ("sigma", "model_output", "model_input")),
    # rectified-flow DiTs (Anima, Krea 2): their schedules and what their denoiser predicts
    EntryPoint("comfy.model_sampling", "ModelSamplingDiscreteFlow", (TRAIN, SUGGEST)),
    EntryPoint("comfy.model_sampling", "ModelSamplingFlux", (TRAIN, SUGGEST)),
    EntryPoint("comfy.model_sampling", "CONST.calculate_denoised", (TRAIN, SUGGEST),
               ("sigma", "model_output", "model_input")),
    EntryPoint("comfy.model_sampling", "CONST.noise_scaling", (TRAIN, SUGGEST), ("sigma", "noise", "latent_image")),
    EntryPoint("comfy.model_sampling", "ModelSamplingDiscrete.timestep", (TRAIN, SUGGEST), ("sigma",)),
    EntryPoint("comfy.model_base", "BaseModel.extra_conds", (TRAIN, SUGGEST)),
    EntryPoint("comfy.model_base", "BaseModel.process_latent_in", (TRAIN, SUGGEST), ("latent",)),
    EntryPoint("comfy.model_base", "BaseModel.memory_required", (SUGGEST,), ("input_shape",)),
    EntryPoint("comfy.model_base", "BaseModel.get_dtype", (TRAIN, SUGGEST)),
    EntryPoint("comfy.model_base", "SDXL.encode_adm", (TRAIN, SUGGEST)),
    EntryPoint("comfy.sd", "CLIP.tokenize", (TRAIN, SUGGEST, LAG), ("text",)),
    EntryPoint("comfy.sd", "CLIP.encode_from_tokens_scheduled", (TRAIN, SUGGEST, LAG), ("tokens",)),
    # Running, progress, previews, cancelling.
    EntryPoint("comfy.model_management", "load_models_gpu", (TRAIN, SUGGEST), ("models", "force_full_load")),
    EntryPoint("comfy.model_management", "get_free_memory", (SUGGEST,), ("dev",)),
    EntryPoint("comfy.model_management", "soft_empty_cache", (TRAIN,)),
    EntryPoint("comfy.model_management", "throw_exception_if_processing_interrupted", (TRAIN, SUGGEST)),
    EntryPoint("comfy.model_management", "InterruptProcessingException", (TRAIN,)),
    EntryPoint("comfy.utils", "ProgressBar.update_absolute", (TRAIN, SUGGEST), ("value", "total", "preview")),
    EntryPoint("latent_preview", "get_previewer", (TRAIN,), ("device", "latent_format")),
    # Files and folders.
    EntryPoint("folder_paths", "get_filename_list", (LOAD, LAG_LORA), ("folder_name",)),
    EntryPoint("folder_paths", "get_full_path", (LOAD, LAG, LAG_LORA), ("folder_name", "filename")),
    EntryPoint("folder_paths", "get_folder_paths", (SAVE, TRAIN), ("folder_name",)),
    EntryPoint("folder_paths", "get_input_directory", (IMAGES,)),
    # The V3 node API. Without these the nodes cannot be defined at all, so the pack's import fails before any
    # check could run (ComfyUI then logs the ImportError); they are listed so that this table is complete.
    *(EntryPoint("comfy_api.latest", name, ()) for name in (
        "ComfyExtension", "io.ComfyNode", "io.Schema", "io.NodeOutput", "io.Custom", "io.Float.Input",
        "io.Int.Input", "io.String.Input", "io.Boolean.Input", "io.Combo.Input", "io.Image.Input",
        "io.Image.Output", "io.Mask.Input", "io.Mask.Output", "io.Model.Input", "io.Model.Output", "io.Clip.Input",
        "io.Vae.Input", "io.Latent.Input", "io.Conditioning.Output", "io.String.Output")),
    # V3 types the schemas use beyond the basic ones.
    EntryPoint("comfy_api.latest", "io.LossMap", (TRAIN,)),
    EntryPoint("comfy_api.latest", "io.Hidden.unique_id", ()),
    EntryPoint("comfy_api.latest", "ui.PreviewImage", (PREVIEW,)),
    EntryPoint("comfy_api.latest", "ui.PreviewText", (SUGGEST,)),
    # Text under a node (warnings, progress): without it they reach only the console.
    EntryPoint("server", "PromptServer.send_progress_text", (), ("text", "node_id")),
)


class _MissingModule(ModuleType):
    """Stands for a host module that failed to import: any use raises the self-check's message."""

    def __init__(self, name: str, error: BaseException) -> None:
        super().__init__(name)
        self._error = error

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        raise PerResError(f"this ComfyUI ({host_version()}) has no module {self.__name__} "
                          f"({type(self._error).__name__}: {self._error}). {_ADVICE}")


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as exc:  # a host module that moved or fails to import: reported by the self-check
        return _MissingModule(name, exc)


for _name in HOST_MODULES:
    _import(_name)  # submodules become attributes of the comfy package
comfy = _import("comfy")
folder_paths = _import("folder_paths")
latent_preview = _import("latent_preview")

_ADVICE = (f"PerRes is tested on ComfyUI {TESTED_HOSTS[0]} to {TESTED_HOSTS[-1]}; newer versions are expected to "
           "work until one moves an entry point PerRes uses. Update PerRes, or report this message to PerRes; the "
           "PerRes nodes that do not need it keep working.")


def host_version() -> str:
    """'ComfyUI 0.33.0' (from the host's comfyui_version module), or 'ComfyUI of unknown version'."""
    try:
        return f"ComfyUI {importlib.import_module('comfyui_version').__version__}"
    except Exception:  # older hosts and unusual installs have no version module
        return "ComfyUI of unknown version"


def problem(entry: EntryPoint) -> str | None:
    """What is wrong with one entry point in the running host ('missing', 'no parameter …'), or None."""
    try:
        found: Any = importlib.import_module(entry.module)
        for part in entry.attribute.split("."):
            found = getattr(found, part)
    except Exception as exc:  # ImportError, AttributeError, or whatever a broken host module raises
        return f"missing ({type(exc).__name__}: {exc})"
    if not entry.parameters:
        return None
    try:
        parameters = inspect.signature(found).parameters
    except (TypeError, ValueError):
        return None  # a builtin or C callable: its signature cannot be read, nothing to compare
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return None  # takes any keyword (a wrapper that passes everything on): nothing to compare
    lost = [name for name in entry.parameters if name not in parameters]
    return f"changed: no parameter {', '.join(repr(n) for n in lost)}" if lost else None


def host_problems(node_id: str | None = None) -> list[tuple[EntryPoint, str]]:
    """(entry point, problem) for every entry point that is missing or changed; only those `node_id` needs
    when given."""
    entries = [e for e in ENTRY_POINTS if node_id is None or node_id in e.needed_by]
    return [(entry, found) for entry in entries if (found := problem(entry)) is not None]


def host_report(problems: list[tuple[EntryPoint, str]]) -> str:
    lines = "; ".join(f"{entry.name}: {found}" for entry, found in problems)
    return f"this ComfyUI ({host_version()}) lacks what PerRes needs here: {lines}. {_ADVICE}"


def log_host_check() -> None:
    """The load-time self-check: one console message naming every missing or changed entry point."""
    problems = host_problems()
    if not problems:
        log.debug("PerRes host self-check: %s provides all %d entry points", host_version(), len(ENTRY_POINTS))
        return
    affected = sorted({node for entry, _ in problems for node in entry.needed_by})
    log.warning("PerRes: %s Affected nodes: %s.", host_report(problems), ", ".join(affected) or "none")


def require_host(node_id: str) -> None:
    """Raise the self-check's message when the running host lacks an entry point `node_id` needs."""
    problems = host_problems(node_id)
    if problems:
        raise PerResError(host_report(problems))
