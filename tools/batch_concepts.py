"""Concept folders → training prompts for PerRes batch personalization (tools/perres_batch.py).

A concept is a folder of images plus an optional `concept.json` whose keys are inputs of PerRes Train
Residuals (identifier, class_word, steps, batch_size, learning_rate, rank_ratio, resolution, seed, init,
gradient_checkpointing). The prompt is the training part of the API-format example workflow.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_WORKFLOW = os.path.join(os.path.dirname(TOOLS_DIR), "example_workflows", "api", "perres_train_and_sample.json")
CONCEPT_FILE = "concept.json"
# The formats PerRes Load Concept Images reads (nodes/image_nodes.py; importing it would import ComfyUI).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# A concept name becomes a path part of the save prefix, so it obeys PerRes Save Residuals' rule.
SAFE_NAME = re.compile(r"^[\w\-.]+$")
UPLOAD_ROOT = "perres_batch"

CHECKPOINT, IMAGES, TRAIN, SAVE, PREVIEW = (
    "CheckpointLoaderSimple", "PerResLoadConceptImages", "PerResTrainResiduals", "PerResSaveResiduals", "PreviewAny")
# Ids of the two nodes the tool adds: stock Preview Any nodes that put the loss list and the saved file
# name into the history (the Train node's loss and Save's filename are outputs, not UI, otherwise).
LOSS_NODE, FILE_NODE = "perres_batch_loss", "perres_batch_file"


class ConceptError(ValueError):
    """A concept folder or its concept.json cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Concept:
    name: str
    folder: str
    images: tuple[str, ...]
    settings: dict[str, Any]  # inputs of PerRes Train Residuals
    digest: str  # of the image names and bytes: a changed folder is uploaded to a new server folder

    @property
    def upload_folder(self) -> str:
        """Folder under the server's input/ that receives the images (new content → new folder, no stale files)."""
        return f"{UPLOAD_ROOT}/{self.name}-{self.digest}"


@dataclass(frozen=True)
class TrainingPrompt:
    prompt: dict[str, dict]
    train_node: str


def load_workflow(path: str = DEFAULT_WORKFLOW) -> dict[str, dict]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def node_of(workflow: dict[str, dict], class_type: str) -> str:
    ids = [node_id for node_id, node in workflow.items() if node["class_type"] == class_type]
    if len(ids) != 1:
        raise ConceptError(f"the workflow must have exactly one {class_type} node, it has {len(ids)}.")
    return ids[0]


def train_settings(workflow: dict[str, dict]) -> dict[str, Any]:
    """The widget values of the Train node: the settings a concept may change, with their defaults."""
    inputs = workflow[node_of(workflow, TRAIN)]["inputs"]
    return {key: value for key, value in inputs.items() if not isinstance(value, list)}


def _image_digest(folder: str, names: list[str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0")
        with open(os.path.join(folder, name), "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()[:12]


def read_concept(folder: str, defaults: dict[str, Any]) -> Concept:
    """One concept folder; `defaults` are the workflow's settings updated with the command line's."""
    name = os.path.basename(os.path.normpath(folder))
    if not SAFE_NAME.match(name):
        raise ConceptError(f"concept folder '{name}': use letters, digits, '-', '_' and '.' in its name.")
    images = sorted(n for n in os.listdir(folder)
                    if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n)))
    if not images:
        raise ConceptError(f"concept folder '{name}' has no images ({', '.join(IMAGE_EXTENSIONS)}).")
    settings = dict(defaults)
    path = os.path.join(folder, CONCEPT_FILE)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as handle:
                own = json.load(handle)
        except ValueError as exc:
            raise ConceptError(f"{path} is not valid JSON ({exc}).") from exc
        if not isinstance(own, dict):
            raise ConceptError(f"{path} must hold an object such as "
                               '{"identifier": "sks", "class_word": "dog"}.')
        unknown = sorted(set(own) - set(defaults))
        if unknown:
            raise ConceptError(f"{path}: unknown keys {unknown}; the keys are {sorted(defaults)}.")
        settings.update(own)
    if not settings.get("class_word"):
        raise ConceptError(f"concept '{name}' has no class_word: write it in {CONCEPT_FILE} "
                           "(e.g. {\"class_word\": \"dog\"}) or pass --set class_word=dog.")
    return Concept(name, folder, tuple(images), settings, _image_digest(folder, images))


def find_concepts(root: str, defaults: dict[str, Any]) -> list[Concept]:
    """Every subfolder of `root` is a concept; all problems are reported at once, before any training."""
    folders = sorted(entry.path for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    concepts, problems = [], []
    for folder in folders:
        try:
            concepts.append(read_concept(folder, defaults))
        except ConceptError as exc:
            problems.append(str(exc))
    if problems:
        raise ConceptError("\n".join(problems))
    if not concepts:
        raise ConceptError(f"'{root}' has no concept folders (one subfolder of images per concept).")
    return concepts


def _ancestors(workflow: dict[str, dict], node_id: str) -> set[str]:
    seen, stack = set(), [node_id]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(value[0] for value in workflow[current]["inputs"].values() if isinstance(value, list))
    return seen


def _loss_output(workflow: dict[str, dict], train_id: str) -> list:
    """The link to the Train node's loss output, as the workflow's Plot Loss Graph uses it."""
    for node in workflow.values():
        link = node["inputs"].get("loss")
        if isinstance(link, list) and link[0] == train_id:
            return list(link)
    raise ConceptError("the workflow has no node fed by the loss output of PerRes Train Residuals.")


def training_prompt(workflow: dict[str, dict], concept: Concept, checkpoint: str, prefix: str) -> TrainingPrompt:
    """Load Checkpoint → Load Concept Images → Train → Save of `workflow`, set up for `concept`."""
    train_id, save_id = node_of(workflow, TRAIN), node_of(workflow, SAVE)
    prompt = {node_id: copy.deepcopy(workflow[node_id]) for node_id in _ancestors(workflow, save_id)}
    prompt[node_of(prompt, CHECKPOINT)]["inputs"]["ckpt_name"] = checkpoint
    prompt[node_of(prompt, IMAGES)]["inputs"].update(folder=concept.upload_folder,
                                                     resolution=concept.settings["resolution"])
    prompt[train_id]["inputs"].update(concept.settings)
    prompt[save_id]["inputs"]["filename_prefix"] = f"{prefix.strip('/')}/{concept.name}"
    prompt[LOSS_NODE] = {"class_type": PREVIEW, "inputs": {"source": _loss_output(workflow, train_id)}}
    prompt[FILE_NODE] = {"class_type": PREVIEW, "inputs": {"source": [save_id, 0]}}
    return TrainingPrompt(prompt, train_id)


def read_results(outputs: dict[str, dict]) -> tuple[str, float | None]:
    """(saved file relative to models/loras, final loss) from the history outputs of a training prompt."""
    file = outputs[FILE_NODE]["text"][0]
    try:
        loss = float(json.loads(outputs[LOSS_NODE]["text"][0])["loss"][-1])
    except (KeyError, IndexError, TypeError, ValueError):
        loss = None
    return file, loss
