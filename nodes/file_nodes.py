"""Saving and loading residual files under models/loras, where the stock LoRA loaders see them too."""
from __future__ import annotations

import logging
import os
import re

from comfy_api.latest import io

from .host.entry_points import folder_paths
from ..perres_core import __version__
from ..perres_core.errors import PerResError
from ..perres_core.residual import ResidualSet
from ..perres_core.residual_file import is_residual_file, load_residual_file, save_residual_file
from .node_guard import guarded
from .types import Residuals

log = logging.getLogger("perres")
SAVE_NAME = "PerRes Save Residuals"
LOAD_NAME = "PerRes Load Residuals"
SAFE_PART = re.compile(r"^[\w\-. ]+$")


def loras_root() -> str:
    return folder_paths.get_folder_paths("loras")[0]


def checked_prefix(prefix: str, input_name: str = "filename_prefix") -> list[str]:
    """Split 'sub/dir/name' into safe parts; refuse absolute paths, drive letters and '..'. `input_name` names
    the node's input in the errors."""
    text = prefix.strip().replace("\\", "/")
    if not text:
        raise PerResError(f"{input_name} is empty; give a name such as 'perres/my_dog'.")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise PerResError(f"{input_name} '{prefix}' is an absolute path; give a path relative to models/loras.")
    parts = [part for part in text.split("/") if part not in ("", ".")]
    for part in parts:
        if part == ".." or not SAFE_PART.match(part):
            raise PerResError(f"{input_name} '{prefix}' contains '{part}'; use letters, digits, '-', '_', '.', "
                              "and '/' for subfolders of models/loras (no '..').")
    return parts


def next_free_path(root: str, parts: list[str]) -> str:
    """root/<parts>_00001.safetensors with the first counter whose file does not exist yet."""
    directory = os.path.join(root, *parts[:-1])
    stem = parts[-1].removesuffix(".safetensors")
    counter = 1
    while True:
        path = os.path.join(directory, f"{stem}_{counter:05d}.safetensors")
        if not os.path.exists(path):
            return path
        counter += 1


def save_to_loras(residuals: ResidualSet, filename_prefix: str) -> str:
    """Write the residual file under models/loras and return its path relative to that folder."""
    root = os.path.realpath(loras_root())
    parts = checked_prefix(filename_prefix)
    for _ in range(100):  # another process may take the same name between the check and the write
        path = next_free_path(root, parts)
        try:
            save_residual_file(residuals, path, __version__)
            break
        except PerResError:
            if not os.path.exists(path):
                raise
    else:
        raise PerResError(f"could not find a free file name for '{filename_prefix}'.")
    return os.path.relpath(path, root).replace(os.sep, "/")


class SaveResiduals(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerResSaveResiduals",
            display_name=SAVE_NAME,
            category="PerRes",
            description="Saves residuals as a safetensors LoRA under models/loras (a new numbered file every time, "
                        "never overwriting). Stock LoRA loaders and kohya-style tools read it as a LoRA.",
            inputs=[
                Residuals.Input("residuals", tooltip="From PerRes Train Residuals or PerRes Load Residuals."),
                io.String.Input("filename_prefix", default="perres/concept",
                                tooltip="Path under models/loras; '_00001.safetensors' etc. is appended. Absolute "
                                        "paths and '..' are refused."),
            ],
            outputs=[io.String.Output(display_name="filename", tooltip="The saved file, relative to models/loras.")],
            is_output_node=True,
        )

    @classmethod
    @guarded
    def execute(cls, residuals: ResidualSet, filename_prefix: str) -> io.NodeOutput:
        relative = save_to_loras(residuals, filename_prefix)
        log.info("%s: saved %s", SAVE_NAME, relative)
        return io.NodeOutput(relative, ui={"text": [f"saved models/loras/{relative}"]})


def lora_file_list() -> list[str]:
    """Every file under models/loras, for a combo. Empty when the host's folder_paths moved: the schema must
    still build so the node registers (the host self-check names what is missing, and the node refuses to run)."""
    try:
        return folder_paths.get_filename_list("loras")
    except Exception as exc:  # whatever a moved host API raises; reported by the self-check
        log.debug("no LoRA list for the node schemas: %s", exc)
        return []


def residual_file_list() -> list[str]:
    """The files under models/loras whose header says PerRes saved them, not every LoRA installed.

    folder_paths rescans when a folder changes and the header check is cached per file version, so
    files saved while the server runs appear at the next refresh at the cost of one header read each.
    """
    return [name for name in lora_file_list() if is_residual_file(folder_paths.get_full_path("loras", name) or "")]


class LoadResiduals(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerResLoadResiduals",
            display_name=LOAD_NAME,
            category="PerRes",
            description="Loads a residual file saved by PerRes Save Residuals from models/loras and checks it; the "
                        "node shows the model family the residual was trained on (SD1.x, SDXL, Anima or Krea 2) "
                        "and its words.",
            inputs=[io.Combo.Input("residual_name", options=residual_file_list(),
                                   tooltip="A residual saved by PerRes Save Residuals; only files under "
                                           "models/loras that carry PerRes metadata are listed.")],
            outputs=[Residuals.Output(display_name="residuals", tooltip="The concept's residuals and its words "
                                                                        "(identifier and class word).")],
        )

    @classmethod
    def fingerprint_inputs(cls, residual_name: str):
        path = folder_paths.get_full_path("loras", residual_name)
        return os.path.getmtime(path) if path else residual_name

    @classmethod
    @guarded
    def execute(cls, residual_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path("loras", residual_name)
        if path is None:
            raise PerResError(f"'{residual_name}' is not in models/loras; refresh the node list or re-save it.")
        residuals = load_residual_file(path)
        return io.NodeOutput(residuals, ui={"text": [describe(residuals)]})


def describe(residuals: ResidualSet) -> str:
    """One line for the node: the family the residual fits, its words and how it was trained."""
    concept, training = residuals.concept, residuals.training
    details = [f"{training['steps']} steps" if "steps" in training else "",
               f"{training['resolution']} px" if "resolution" in training else "",
               "v-prediction" if training.get("prediction") == "v" else ""]
    details = ", ".join(part for part in details if part)
    return (f"{residuals.base_model} residual '{concept.identifier} {concept.class_word}'"
            f"{f' ({details})' if details else ''}, {len(residuals.layers)} layers; "
            f"use it on {residuals.base_model} models.")
