"""Generate the example workflows (UI format and API format) from one description.

    . ~/ComfyUI/.venv/bin/activate && python tools/make_workflows.py [--comfyui ~/ComfyUI]

Each workflow below is described once: nodes with their widget values by input name and their
links by input name. The script starts the real ComfyUI in-process (like tests/comfy_host.py),
reads every node's inputs the way GET /object_info reports them, and writes

  example_workflows/<name>.json      the frontend's workflow format ("version": 0.4), whose
                                     widgets_values follow the node's input order;
  example_workflows/api/<name>.json  the same graph for POST /prompt.

tests/test_workflows.py converts every UI file back to API form and checks it equals its twin, then
runs each API workflow through ComfyUI's executor.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "example_workflows")
log = logging.getLogger("perres.make_workflows")

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Frontend-only nodes: they are saved in UI workflows but never sent to the server.
VIRTUAL_TYPES = {"Note", "MarkdownNote"}
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds a control widget to these unless told otherwise

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"  # or any SDXL, Pony, Illustrious or NoobAI checkpoint
ROBOT_RESIDUAL = "perres/robot_00001.safetensors"
DOG_RESIDUAL = "perres/dog_00001.safetensors"
CAT_RESIDUAL = "perres/cat_00001.safetensors"
ROBOT_SDXL_RESIDUAL = "perres/robot_sdxl_00001.safetensors"  # what perres_sdxl_train_and_sample saves
# The diffusion transformers' files (models/diffusion_models, text_encoders, vae): the names of the releases;
# users pick their own files in the loaders.
ANIMA_MODEL = "anima.safetensors"
ANIMA_TEXT_ENCODER = "qwen_3_06b_base.safetensors"
KREA2_RAW, KREA2_TURBO = "krea2_raw.safetensors", "krea2_turbo.safetensors"
KREA2_TEXT_ENCODER = "qwen3_vl_4b.safetensors"
WAN_VAE = "wan_2.1_vae.safetensors"
# Any two character LoRAs of the user's (SD1.5, and SDXL-family for the SDXL workflow); their trigger words go
# into the LAG LoRA nodes and the prompt.
LORA_A, LORA_B = "character_a.safetensors", "character_b.safetensors"
SDXL_LORA_A, SDXL_LORA_B = "character_a_sdxl.safetensors", "character_b_sdxl.safetensors"
# the node's default candidate list, kept in the workflow so it opens with the same words
DEFAULT_CANDIDATES = ("person, man, woman, child, baby\ndog, cat, bird, rabbit, horse\ntoy, teddy bear, stuffed animal, "
                      "doll, figurine, robot\nbackpack, handbag, shoe, sneaker, sunglasses, watch, cup, mug, vase, "
                      "teapot, bowl, candle, chair, lamp, guitar\ncar, bicycle, motorcycle, boat\nhouse, building, "
                      "castle\ncake, pizza, fruit\nflower, plant, tree\nlandscape, mountain, beach, city, room")
NEGATIVE = "blurry, low quality, deformed, watermark, text"
# Paper §4.1: DDIM, 50 steps, eta 0, guidance 6.0.
SAMPLER = {"seed": 42, "steps": 50, "cfg": 6.0, "sampler_name": "ddim", "scheduler": "ddim_uniform", "denoise": 1.0}


# --------------------------------------------------------------------------------------------------
# Description
# --------------------------------------------------------------------------------------------------
@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    values: dict[str, Any] = field(default_factory=dict)        # widget values by input name
    links: dict[str, tuple[int, int]] = field(default_factory=dict)  # input name -> (source node, output slot)
    title: Optional[str] = None
    size: Optional[tuple[float, float]] = None


@dataclass
class Group:
    title: str
    members: list[int]
    color: str = "#3f789e"


@dataclass
class Workflow:
    name: str
    nodes: list[Node]
    groups: list[Group] = field(default_factory=list)


def note(node_id: int, pos, text: str, size=(360, 220)) -> Node:
    return Node(node_id, "MarkdownNote", pos, {"text": text}, size=size)


def sampler(node_id: int, pos, model, positive, negative, latent, title=None, **overrides) -> Node:
    return Node(node_id, "KSampler", pos, {**SAMPLER, **overrides},
                {"model": model, "positive": positive, "negative": negative, "latent_image": latent}, title=title)


# Layout: columns of nodes, COLUMN_GAP apart, and ROW_GAP between a node's bottom and the next node's
# pos (litegraph draws the 30 px title bar above pos). tests/test_ui.py checks in the real frontend that
# no node overlaps another.
COLUMNS = (0, 440, 900, 1280)
ROW_GAP = 60
PROMPT_HEIGHT = 204  # a CLIPTextEncode, as node_size() makes it


def base_nodes(ckpt_id: int = 1, negative_id: int = 5, latent_id: int = 6,
               prompts_at: tuple[float, float] = (COLUMNS[1], 460), checkpoint: str = CHECKPOINT,
               size: int = 512) -> list[Node]:
    """Load Checkpoint at the origin; the negative prompt at `prompts_at`, the empty latent below it."""
    x, y = prompts_at
    return [
        Node(ckpt_id, "CheckpointLoaderSimple", (0, 0), {"ckpt_name": checkpoint}),
        Node(negative_id, "CLIPTextEncode", (x, y), {"text": NEGATIVE}, {"clip": (ckpt_id, 1)},
             title="Negative prompt"),
        Node(latent_id, "EmptyLatentImage", (x, y + PROMPT_HEIGHT + ROW_GAP),
             {"width": size, "height": size, "batch_size": 1}),
    ]


def lag_node(node_id: int, pos, prompt: str, links: dict, size: tuple[float, float]) -> Node:
    return Node(node_id, "PerResLAGSampling", pos,
                {"prompt": prompt, "concept_words": "", "strength": 1.0, "threshold": "median", "quantile": 0.5,
                 "start_percent": 0.0, "end_percent": 1.0, "outside_window": "full residual"}, links, size=size)


def lag_outputs(ids: tuple[int, int, int, int], lag: int, negative: int, latent: int, prefix: str,
                sampler_values: Optional[dict] = None, vae: tuple[int, int] = (1, 2)) -> list[Node]:
    """KSampler, VAE Decode and Save Image right of a PerRes LAG Sampling node, its mask preview under the decode."""
    sample_id, decode_id, save_id, preview_id = ids
    return [
        sampler(sample_id, (COLUMNS[2], 0), (lag, 0), (lag, 1), (negative, 0), (latent, 0), **(sampler_values or {})),
        Node(decode_id, "VAEDecode", (COLUMNS[3], 0), {}, {"samples": (sample_id, 0), "vae": vae}),
        Node(save_id, "SaveImage", (COLUMNS[3] + 460, 0), {"filename_prefix": prefix}, {"images": (decode_id, 0)},
             size=(400, 450)),
        Node(preview_id, "PerResLAGMaskPreview", (COLUMNS[3], 160), {}, {"model": (lag, 0), "samples": (sample_id, 0)},
             size=(400, 450)),
    ]


# The bundled toy robot as `sks toy`, with the paper's training settings (§4.1).
TRAIN_VALUES = {"identifier": "sks", "class_word": "toy", "steps": 150, "batch_size": 4, "learning_rate": 1e-3,
                "rank_ratio": 0.05, "resolution": 512, "seed": 0, "init": "random", "gradient_checkpointing": True}


# PerRes Train Residuals: its widgets take 320×594 (node_size()); the 300 px below them hold the preview and the
# progress text it shows while training, which the frontend would otherwise draw over the nodes below.
TRAIN_SIZE = (320, 594 + 300)


def train_save_plot(ids: tuple[int, int, int], links: dict, prefix: str, x: int = 420, **values) -> list[Node]:
    """PerRes Train Residuals at (x, 0), PerRes Save Residuals and Plot Loss Graph to its right."""
    train_id, save_id, loss_id = ids
    return [
        Node(train_id, "PerResTrainResiduals", (x, 0), {**TRAIN_VALUES, **values}, links, size=TRAIN_SIZE),
        Node(save_id, "PerResSaveResiduals", (x + 420, 0), {"filename_prefix": prefix}, {"residuals": (train_id, 1)}),
        Node(loss_id, "LossGraphNode", (x + 420, 160), {"filename_prefix": "perres_loss_graph"},
             {"loss": (train_id, 2)}, size=(400, 300)),
    ]


# The sampling row of trained_and_sampled, its group clear of the training group.
SAMPLING_ROW = TRAIN_SIZE[1] + 130


@dataclass
class Loaders:
    """The nodes that load the model, and where training and sampling take model, clip and vae from."""

    nodes: list[Node]
    model: tuple[int, int]
    clip: tuple[int, int]
    vae: tuple[int, int]
    sample_model: tuple[int, int] = (3, 0)     # the Train node's patched model
    sampling_nodes: list[int] = field(default_factory=list)  # loader nodes that belong to the sampling group
    latent: str = "EmptyLatentImage"           # the empty latent of the family (16 channels for the DiTs)


def checkpoint_loaders(checkpoint: str) -> Loaders:
    return Loaders([Node(1, "CheckpointLoaderSimple", (-420, 0), {"ckpt_name": checkpoint})], (1, 0), (1, 1), (1, 2))


def diffusion_model_loaders(model: str, weight_dtype: str, text_encoder: str, clip_type: str,
                            sample_with: Optional[str] = None) -> Loaders:
    """Load Diffusion Model, Load CLIP and Load VAE, as DiTs are loaded; with `sample_with`, a second diffusion
    model (another checkpoint of the family) samples with the trained residual through PerRes Apply Residuals."""
    nodes = [Node(1, "UNETLoader", (-420, 0), {"unet_name": model, "weight_dtype": weight_dtype},
                  title="Load Diffusion Model (train on it)" if sample_with else None),
             Node(14, "CLIPLoader", (-420, 160), {"clip_name": text_encoder, "type": clip_type}),
             Node(15, "VAELoader", (-420, 350), {"vae_name": WAN_VAE})]
    if sample_with is None:
        return Loaders(nodes, (1, 0), (14, 0), (15, 0), latent="EmptySD3LatentImage")
    nodes += [Node(16, "UNETLoader", (-420, SAMPLING_ROW), {"unet_name": sample_with, "weight_dtype": weight_dtype},
                   title="Load Diffusion Model (sample with it)"),
              Node(17, "PerResApplyResiduals", (0, SAMPLING_ROW), {"strength": 1.0},
                   {"model": (16, 0), "residuals": (3, 1)})]
    return Loaders(nodes, (1, 0), (14, 0), (15, 0), sample_model=(17, 0), sampling_nodes=[16, 17],
                   latent="EmptySD3LatentImage")


def trained_and_sampled(name: str, loaders: Loaders, size: int, prefix: str, image_prefix: str, prompt: str,
                        notes: str, train_values: dict, sampler_values: dict, note_height: int = 300) -> Workflow:
    """Loaders → Load Concept Images → Train (→ Save, Plot Loss) → sample with the trained model."""
    y = SAMPLING_ROW
    return Workflow(name, [
        *loaders.nodes,
        Node(2, "PerResLoadConceptImages", (0, 0), {"folder": "perres_example", "resolution": size}),
        *train_save_plot((3, 4, 5), {"model": loaders.model, "clip": loaders.clip, "vae": loaders.vae,
                                     "images": (2, 0)}, f"perres/{prefix}", **train_values),
        Node(6, "PreviewImage", (0, 228), {}, {"images": (2, 0)}, title="Training crops", size=(360, 300)),
        Node(7, "CLIPTextEncode", (420, y), {"text": prompt}, {"clip": loaders.clip}, title="Positive prompt"),
        Node(8, "CLIPTextEncode", (420, y + PROMPT_HEIGHT + ROW_GAP), {"text": NEGATIVE}, {"clip": loaders.clip},
             title="Negative prompt"),
        Node(9, loaders.latent, (420, y + 2 * (PROMPT_HEIGHT + ROW_GAP)),
             {"width": size, "height": size, "batch_size": 1}),
        sampler(10, (840, y), loaders.sample_model, (7, 0), (8, 0), (9, 0), **sampler_values),
        Node(11, "VAEDecode", (1220, y), {}, {"samples": (10, 0), "vae": loaders.vae}),
        Node(12, "SaveImage", (1600, y), {"filename_prefix": image_prefix}, {"images": (11, 0)},
             size=(400, 450)),
        note(13, (1320, 0), notes, size=(420, note_height)),
    ], [Group("Training", [2, 3, 4, 5, 6]), Group("Sampling with the trained model",
                                                    [*loaders.sampling_nodes, 7, 8, 9, 10, 11, 12], color="#8A8")])


def train_and_sample() -> Workflow:
    return trained_and_sampled(
        "perres_train_and_sample", checkpoint_loaders(CHECKPOINT), 512, "robot", "perres/trained",
        "a photo of a sks toy on a wooden desk next to a cup of coffee", (
            "## Train personalized residuals\n\n"
            "1. Put 3-20 photos of your concept in a folder under `ComfyUI/input` (e.g. `input/my_dog`) and "
            "enter that folder name. The default `perres_example` uses the pack's bundled toy robot.\n"
            "2. Choose a rare `identifier` (`sks`) and the concept's `class_word` (`dog`, `toy`, ...).\n"
            "3. Queue. 150 steps take a few minutes on a GPU. The residual is saved to "
            "`models/loras/perres/robot_00001.safetensors`. The other example workflows load that file.\n\n"
            "The prompt must contain the identifier and class word (`sks toy`)."), {}, {})


# SDXL is usually sampled with fewer steps of a second-order sampler than the paper's DDIM 50 on SD1.5.
SDXL_SAMPLER = {"steps": 30, "sampler_name": "dpmpp_2m", "scheduler": "karras"}


def sdxl_train_and_sample() -> Workflow:
    return trained_and_sampled(
        "perres_sdxl_train_and_sample", checkpoint_loaders(SDXL_CHECKPOINT), 1024, "robot_sdxl", "perres/trained_sdxl",
        "a photo of a sks toy on a wooden desk next to a cup of coffee, soft window light", (
            "## Train personalized residuals on SDXL\n\n"
            "The same chain as for SD1.5: Load Checkpoint takes SDXL or any descendant (Pony, Illustrious, "
            "NoobAI). PerRes reads the family from the checkpoint and trains its 11 proj_out layers "
            "(1.19 M parameters).\n\n"
            "- `resolution` 0 trains at SDXL's own 1024 px. Keep `gradient_checkpointing` on for 12-16 GB cards.\n"
            "- v-prediction checkpoints (NoobAI v-pred) are detected and trained with the v target. If yours is "
            "not detected, put a ModelSamplingDiscrete node (v_prediction, zsnr) after Load Checkpoint.\n"
            "- The residual is saved as an SDXL LoRA (`models/loras/perres/robot_sdxl_00001.safetensors`) that "
            "LoraLoaderModelOnly and other SDXL tools read.\n\n"
            "The prompt must contain the identifier and class word (`sks toy`)."),
        {"resolution": 0},  # 0: the model family's own resolution, 1024 px for SDXL
        SDXL_SAMPLER, note_height=380)


# Anima and Krea 2 are sampled as their model cards suggest: Anima with a flow sampler at cfg 4, Krea 2 Turbo
# (the distilled checkpoint) in 8 steps without guidance.
# A rare word both Qwen text encoders read as one token ('sks' is two there; a single token binds the concept
# more cleanly, and the Train node warns otherwise).
QWEN_IDENTIFIER = "olis"
ANIMA_SAMPLER = {"steps": 30, "cfg": 4.0, "sampler_name": "er_sde", "scheduler": "simple"}
KREA2_TURBO_SAMPLER = {"steps": 8, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"}


def anima_train_and_sample() -> Workflow:
    return trained_and_sampled(
        "perres_anima_train_and_sample", diffusion_model_loaders(ANIMA_MODEL, "default", ANIMA_TEXT_ENCODER,
                                                                 "stable_diffusion"),
        1024, "robot_anima", "perres/trained_anima",
        "a photo of an olis toy on a wooden desk next to a cup of coffee, soft window light", (
            "## Train personalized residuals on Anima\n\n"
            "Anima is loaded as three files: Load Diffusion Model (the DiT), Load CLIP (its Qwen3-0.6B text "
            "encoder) and Load VAE (the Wan 2.1 VAE). PerRes reads the family from the model and trains its "
            "84 block output layers (self- and cross-attention output, MLP out: 3.10 M parameters, the paper's "
            "share of the model).\n\n"
            "- `resolution` 0 trains at Anima's 1024 px. `weight_dtype` fp8_e4m3fn halves the model's memory and "
            "still trains (the residual stays fp32).\n"
            "- The residual is saved as a LoRA (`models/loras/perres/robot_anima_00001.safetensors`) that "
            "LoraLoaderModelOnly applies to any Anima checkpoint.\n\n"
            "The identifier is `olis`: Qwen's tokenizer splits `sks` in two, `olis` is one token. The prompt "
            "must contain the identifier and class word (`olis toy`)."),
        {"resolution": 0, "identifier": QWEN_IDENTIFIER}, ANIMA_SAMPLER, note_height=420)


def krea2_train_and_sample() -> Workflow:
    return trained_and_sampled(
        "perres_krea2_train_and_sample", diffusion_model_loaders(KREA2_RAW, "fp8_e4m3fn", KREA2_TEXT_ENCODER, "krea2",
                                                                 sample_with=KREA2_TURBO),
        1024, "robot_krea2", "perres/trained_krea2",
        "a photo of an olis toy on a wooden desk next to a cup of coffee, soft window light", (
            "## Train on Krea 2 RAW, sample with Turbo\n\n"
            "Load Diffusion Model loads Krea 2 RAW with `weight_dtype` fp8_e4m3fn (how the 12 B model fits a "
            "24 GB card), Load CLIP its Qwen3-VL-4B text encoder (type `krea2`), Load VAE the Wan 2.1 VAE. PerRes "
            "trains the 56 block output layers (attention out, MLP down: 18.5 M parameters, the paper's share of "
            "the model) in fp32 on the fp8 weights.\n\n"
            "- The residual fits every Krea 2 checkpoint: PerRes Apply Residuals puts it on Krea 2 Turbo (the "
            "second Load Diffusion Model), which samples in 8 steps at cfg 1.\n"
            "- `resolution` 0 trains at 1024 px; keep `gradient_checkpointing` on below 48 GB.\n"
            "- Saved as a LoRA (`models/loras/perres/robot_krea2_00001.safetensors`) for LoraLoaderModelOnly.\n\n"
            "The identifier is `olis`: Qwen's tokenizer splits `sks` in two, `olis` is one token. The prompt "
            "must contain the identifier and class word (`olis toy`)."),
        {"resolution": 0, "identifier": QWEN_IDENTIFIER}, KREA2_TURBO_SAMPLER, note_height=460)


def suggest_class_word() -> Workflow:
    return Workflow("perres_suggest_class_word", [
        Node(1, "CheckpointLoaderSimple", (-420, 0), {"ckpt_name": CHECKPOINT}),
        Node(2, "PerResLoadConceptImages", (0, 0), {"folder": "perres_example", "resolution": 512}),
        Node(3, "PerResSuggestClassWord", (420, 0),
             {"candidates": DEFAULT_CANDIDATES, "budget": 12, "seed": 0, "resolution": 512},
             {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "images": (2, 0)}, size=(420, 520)),
        *train_save_plot((4, 5, 6), {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "images": (2, 0),
                                     "class_word": (3, 0)}, "perres/suggested", x=900),
        note(7, (0, 220), (
            "## Which class word?\n\n"
            "PerRes Suggest Class Word asks the frozen model itself which caption `a photo of a <word>` fits "
            "your photos best (a diffusion classifier). The ranking appears on the node when it has run.\n\n"
            "Its `class_word` output feeds PerRes Train Residuals here, so the winner is trained. To choose "
            "yourself, disconnect the link and type the word. Add the words you hesitate between to the list."),
            size=(380, 260)),
    ], [Group("Choose the class word, then train", [2, 3, 4, 5, 6])])


def train_with_masks() -> Workflow:
    return Workflow("perres_train_with_masks", [
        Node(1, "CheckpointLoaderSimple", (-420, 0), {"ckpt_name": CHECKPOINT}),
        Node(2, "PerResLoadConceptImages", (0, 0), {"folder": "perres_cutout", "resolution": 512}),
        *train_save_plot((3, 4, 5), {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "images": (2, 0),
                                     "masks": (2, 1)}, "perres/robot_cutout",
                         background_weight=0.1, invert_masks=False),
        Node(6, "PreviewImage", (0, 200), {}, {"images": (2, 0)}, title="Training crops", size=(360, 300)),
        Node(7, "MaskToImage", (0, 560), {}, {"mask": (2, 1)}),
        Node(8, "PreviewImage", (0, 690), {}, {"images": (7, 0)}, title="Subject masks (white = the concept)",
             size=(360, 300)),
        note(9, (1320, 0), (
            "## Train with subject masks\n\n"
            "`perres_cutout` holds RGBA cut-outs of the toy robot on a transparent background. **PerRes Load "
            "Concept Images** shows them over white and turns their alpha into `masks` (1 = the robot).\n\n"
            "**PerRes Train Residuals** weights the loss by the masks: the robot counts fully, the background "
            "with `background_weight` (0 ignores it, 1 is the paper's plain loss), so the residual learns the "
            "robot rather than the white backdrop.\n\n"
            "For photos, connect masks from any masking node to `masks`: 1 on the concept, one per image, in "
            "the images' order. The stock Load Image's mask is 1 where a file is transparent: turn on "
            "`invert_masks` for it."), size=(420, 360)),
    ], [Group("Training with subject masks", [2, 3, 4, 5, 6, 7, 8])])


def continue_training() -> Workflow:
    return Workflow("perres_continue_training", [
        Node(1, "CheckpointLoaderSimple", (-420, 0), {"ckpt_name": CHECKPOINT}),
        Node(2, "PerResLoadResiduals", (-420, 200), {"residual_name": ROBOT_RESIDUAL},
             title="Residual to continue"),
        Node(3, "PerResLoadConceptImages", (0, 0), {"folder": "perres_example", "resolution": 512}),
        *train_save_plot((4, 5, 6), {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "images": (3, 0),
                                     "initial_residuals": (2, 0)}, "perres/robot_continued"),
        note(7, (1320, 0), (
            "## Continue a training run\n\n"
            "**PerRes Load Residuals** picks the residual to continue (`perres_train_and_sample` saves "
            "`perres/robot_00001`). **PerRes Train Residuals** starts from it instead of a fresh "
            "initialization and trains `steps` more steps; the saved file records the total.\n\n"
            "Keep the identifier, class word and `rank_ratio` of the first run. With the same seed the run "
            "takes up the first run's random stream where it ended: other batches, timesteps and noise. The "
            "loaded file is never changed.\n\n"
            "AdamW's moments are not saved in the file, so 150 + 150 steps come close to one 300-step run but "
            "are not identical to it."), size=(420, 360)),
    ], [Group("Continuing", [2, 3, 4, 5, 6])])


SNAPSHOT_EVERY = 50  # of TRAIN_VALUES' 150 steps: the residuals of steps 50, 100 and 150


def compare_snapshots() -> Workflow:
    """Train with snapshots; the `snapshots` output list fans Apply → KSampler (one fixed seed) → decode out."""
    prompt = "a photo of a sks toy on a wooden desk next to a cup of coffee"
    x = COLUMNS[2] - 60  # the sampling column, right of PerRes Train Residuals
    return Workflow("perres_compare_snapshots", [
        Node(1, "CheckpointLoaderSimple", (-420, 0), {"ckpt_name": CHECKPOINT}),
        Node(2, "PerResLoadConceptImages", (0, 0), {"folder": "perres_example", "resolution": 512}),
        Node(3, "PerResTrainResiduals", (420, 0),
             {**TRAIN_VALUES, "snapshot_every": SNAPSHOT_EVERY, "snapshot_prefix": "perres/snapshots/robot"},
             {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "images": (2, 0)}, size=TRAIN_SIZE),
        Node(4, "PerResApplyResiduals", (x, 0), {"strength": 1.0}, {"model": (1, 0), "residuals": (3, 3)},
             title="Apply each snapshot"),
        Node(5, "CLIPTextEncode", (x, 176), {"text": prompt}, {"clip": (1, 1)}, title="Positive prompt"),
        Node(6, "CLIPTextEncode", (x, 176 + PROMPT_HEIGHT + ROW_GAP), {"text": NEGATIVE}, {"clip": (1, 1)},
             title="Negative prompt"),
        Node(7, "EmptyLatentImage", (x, 176 + 2 * (PROMPT_HEIGHT + ROW_GAP)),
             {"width": 512, "height": 512, "batch_size": 1}),
        sampler(8, (x + 420, 0), (4, 0), (5, 0), (6, 0), (7, 0), title="KSampler (one seed)"),
        Node(9, "VAEDecode", (x + 420, 376), {}, {"samples": (8, 0), "vae": (1, 2)}),
        Node(10, "SaveImage", (x + 800, 0), {"filename_prefix": "perres/compare_snapshots"}, {"images": (9, 0)},
             size=(400, 450), title="Save Image (steps 50, 100, 150)"),
        note(11, (-420, 200), (
            "## Compare training steps\n\n"
            "**PerRes Train Residuals** saves a snapshot every `snapshot_every` steps (here 50 of 150): "
            "`models/loras/perres/snapshots/robot_step00050_00001.safetensors`, then steps 100 and 150. Its "
            "`snapshots` output is a list, so Apply Residuals, the KSampler and VAE Decode run once per "
            "snapshot, all with the same seed: Save Image shows steps 50, 100 and 150 side by side.\n\n"
            "Keep the step that shows the concept best before it over-fits (every prompt gives the training "
            "photos back). The snapshots appear in **PerRes Load Residuals**. Cancel keeps the snapshots "
            "already written.\n\n"
            "The prompt must contain the identifier and class word (`sks toy`)."), size=(380, 340)),
    ], [Group("Training with snapshots", [2, 3]),
        Group("Sampling every snapshot with one seed", [4, 5, 6, 7, 8, 9, 10], color="#8A8")])


def load_and_apply() -> Workflow:
    prompt = "a photo of a sks toy on a wooden desk next to a cup of coffee"
    return Workflow("perres_load_and_apply", base_nodes(prompts_at=(COLUMNS[1], 444)) + [
        Node(2, "PerResLoadResiduals", (0, 200), {"residual_name": ROBOT_RESIDUAL}),
        Node(3, "PerResApplyResiduals", (COLUMNS[1], 0), {"strength": 1.0}, {"model": (1, 0), "residuals": (2, 0)}),
        Node(4, "CLIPTextEncode", (COLUMNS[1], 180), {"text": prompt}, {"clip": (1, 1)}, title="Positive prompt"),
        sampler(7, (COLUMNS[2], 0), (3, 0), (4, 0), (5, 0), (6, 0)),
        Node(8, "VAEDecode", (COLUMNS[3], 0), {}, {"samples": (7, 0), "vae": (1, 2)}),
        Node(9, "SaveImage", (COLUMNS[3] + 380, 0), {"filename_prefix": "perres/applied"}, {"images": (8, 0)},
             size=(400, 450)),
        note(10, (0, 360), (
            "## Sample with saved residuals (normal sampling)\n\n"
            "Pick a file saved by **PerRes Save Residuals** (under `models/loras`). The residual is added "
            "to all 16 `proj_out` layers, exactly like **LoraLoaderModelOnly** at strength 1.\n\n"
            "Write the identifier and class word in the prompt (`sks toy`).")),
    ])


def residual_lag(name: str, checkpoint: str, size: int, residual: str, prompt: str, prefix: str, notes: str,
                 sampler_values: Optional[dict] = None) -> Workflow:
    """Load Residuals → PerRes LAG Sampling → KSampler → decode and save, with the mask preview."""
    return Workflow(name, base_nodes(checkpoint=checkpoint, size=size) + [
        Node(2, "PerResLoadResiduals", (0, 200), {"residual_name": residual}),
        lag_node(3, (COLUMNS[1], 0), prompt, {"model": (1, 0), "clip": (1, 1), "residuals": (2, 0)}, (400, 400)),
        *lag_outputs((7, 8, 9, 10), lag=3, negative=5, latent=6, prefix=prefix, sampler_values=sampler_values),
        note(11, (0, 360), notes),
    ])


def lag_sampling() -> Workflow:
    return residual_lag(
        "perres_lag_sampling", CHECKPOINT, 512, ROBOT_RESIDUAL,
        "a photo of a sks toy on a sandy beach, a sandcastle in the background", "perres/lag", (
            "## LAG sampling\n\n"
            "**PerRes LAG Sampling** encodes the prompt (wire its `positive` output to the sampler) and applies "
            "the residual only where the concept words (`sks toy`) attend; the base model draws the rest.\n\n"
            "**PerRes LAG Mask Preview** shows where the residual acted, per block resolution."))


def sdxl_lag_sampling() -> Workflow:
    return residual_lag(
        "perres_sdxl_lag_sampling", SDXL_CHECKPOINT, 1024, ROBOT_SDXL_RESIDUAL,
        "a photo of a sks toy on a sandy beach, a sandcastle in the background", "perres/sdxl_lag", (
            "## LAG sampling on SDXL\n\n"
            "The residual saved by `perres_sdxl_train_and_sample`, applied only where `sks toy` attends. Any "
            "SDXL-family checkpoint (Pony, Illustrious, NoobAI) works with a residual trained on it.\n\n"
            "Each of SDXL's transformers has 2 or 10 cross-attentions; the residual's mask comes from all of "
            "them. The mask preview shows SDXL's two transformer resolutions (64 and 32 latent px)."),
        SDXL_SAMPLER)


STITCH_GAP = 16  # white pixels between the normal and the LAG image


def normal_vs_lag() -> Workflow:
    prompt = "a photo of a sks toy on a mossy rock in a forest, a red fox in the background"
    # the loaders on the left, the normal row above the LAG row, each in its group, the stitched pair on the right
    nodes = base_nodes(prompts_at=(0, 360)) + [
        Node(2, "PerResLoadResiduals", (0, 200), {"residual_name": ROBOT_RESIDUAL}),
        Node(3, "PerResApplyResiduals", (COLUMNS[1], -480), {"strength": 1.0}, {"model": (1, 0), "residuals": (2, 0)},
             title="Normal: residual everywhere"),
        lag_node(4, (COLUMNS[1], 0), prompt, {"model": (1, 0), "clip": (1, 1), "residuals": (2, 0)}, (400, 400)),
        # both samplers: same seed, same empty latent, same positive conditioning (from the LAG node)
        sampler(7, (COLUMNS[2], -480), (3, 0), (4, 1), (5, 0), (6, 0), title="KSampler (normal)", seed=1234),
        sampler(8, (COLUMNS[2], 0), (4, 0), (4, 1), (5, 0), (6, 0), title="KSampler (LAG)", seed=1234),
        Node(9, "VAEDecode", (COLUMNS[3], -480), {}, {"samples": (7, 0), "vae": (1, 2)}),
        Node(10, "VAEDecode", (COLUMNS[3], 0), {}, {"samples": (8, 0), "vae": (1, 2)}),
        Node(11, "ImageStitch", (1740, -200), {"direction": "right", "match_image_size": True,
                                               "spacing_width": STITCH_GAP, "spacing_color": "white"},
             {"image1": (9, 0), "image2": (10, 0)}, title="Normal | LAG"),
        Node(12, "SaveImage", (2120, -200), {"filename_prefix": "perres/normal_vs_lag"}, {"images": (11, 0)},
             size=(520, 450)),
        Node(13, "PerResLAGMaskPreview", (COLUMNS[3], 160), {}, {"model": (4, 0), "samples": (8, 0)},
             size=(400, 450)),
        note(14, (0, -480), (
            "## Normal vs. LAG sampling (paper, Figure 4)\n\n"
            "Both samplers start from the same noise (same seed, same latent, same prompt). The saved image "
            "shows the normal result on the left and the LAG result on the right.\n\n"
            "LAG tends to win for new backgrounds, added objects and identity; normal sampling for artistic "
            "styles and changed attributes of the concept.")),
    ]
    return Workflow("perres_normal_vs_lag", nodes, [
        Group("Normal sampling (W + ΔW everywhere)", [3, 7, 9]),
        Group("LAG sampling (residual only where the concept attends)", [4, 8, 10, 13], color="#8A8"),
    ])


def two_concepts_lag() -> Workflow:
    prompt = "a photo of a sks dog and an olis cat on a beach"
    return Workflow("perres_two_concepts_lag", base_nodes(prompts_at=(COLUMNS[1], 480)) + [
        Node(2, "PerResLoadResiduals", (0, 200), {"residual_name": DOG_RESIDUAL}, title="Concept 1 (sks dog)"),
        Node(3, "PerResLoadResiduals", (0, 360), {"residual_name": CAT_RESIDUAL}, title="Concept 2 (olis cat)"),
        Node(4, "PerResLAGConcept", (0, 520), {"concept_words": "", "strength": 1.0}, {"residuals": (3, 0)}),
        lag_node(7, (COLUMNS[1], 0), prompt,
                 {"model": (1, 0), "clip": (1, 1), "residuals": (2, 0), "extra_concepts": (4, 0)}, (400, 420)),
        *lag_outputs((8, 9, 10, 11), lag=7, negative=5, latent=6, prefix="perres/two_concepts"),
        note(12, (0, 720), (
            "## Two concepts with LAG\n\n"
            "Train one residual per concept with different identifiers, e.g. `sks` + `dog` and `olis` + `cat` "
            "(rare words that CLIP keeps as one token), and save them as `perres/dog` and `perres/cat`.\n\n"
            "Each residual acts only where its own words attend; where both claim a location the stronger "
            "attention wins. In the mask preview concept 1 is red, concept 2 blue. Chain more "
            "**PerRes LAG Concept** nodes through their `concepts` input.")),
    ])


def two_loras_lag(name: str, checkpoint: str, size: int, loras: tuple[str, str], prompt: str, prefix: str,
                  notes: str, sampler_values: Optional[dict] = None, loaders: Optional[Loaders] = None) -> Workflow:
    """Two PerRes LAG LoRA nodes, each with its trigger words, → PerRes LAG Sampling → sample, mask preview; the
    model from Load Checkpoint, or from `loaders` (a DiT's three loaders)."""
    if loaders is None:
        loading = base_nodes(prompts_at=(COLUMNS[1], 480), checkpoint=checkpoint, size=size)
        model, clip, vae = (1, 0), (1, 1), (1, 2)
    else:
        y = 480
        loading = [*loaders.nodes,
                   Node(5, "CLIPTextEncode", (COLUMNS[1], y), {"text": NEGATIVE}, {"clip": loaders.clip},
                        title="Negative prompt"),
                   Node(6, loaders.latent, (COLUMNS[1], y + PROMPT_HEIGHT + ROW_GAP),
                        {"width": size, "height": size, "batch_size": 1})]
        model, clip, vae = loaders.model, loaders.clip, loaders.vae
    return Workflow(name, loading + [
        Node(2, "PerResLAGLoRA", (0, 200), {"lora_name": loras[0], "trigger_words": "ohwx, woman", "strength": 1.0},
             title="LoRA 1 (ohwx woman)"),
        Node(3, "PerResLAGLoRA", (0, 420), {"lora_name": loras[1], "trigger_words": "zkz, man", "strength": 1.0},
             {"concepts": (2, 0)}, title="LoRA 2 (zkz man)"),
        lag_node(7, (COLUMNS[1], 0), prompt, {"model": model, "clip": clip, "extra_concepts": (3, 0)}, (400, 420)),
        *lag_outputs((8, 9, 10, 11), lag=7, negative=5, latent=6, prefix=prefix, sampler_values=sampler_values,
                     vae=vae),
        note(12, (0, 660), notes, size=(360, 360) if loaders else (360, 220)),
    ])


LAG_LORA_NOTE = (
    "Pick two {family} LoRAs (kohya, diffusers/PEFT, LoCon, LoHa, LoKr or DoRA) and write each one's "
    "trigger words. Each LoRA then acts only where its own words attend, so the two do not bleed into "
    "each other or into the background. No masks to draw, no extra UNet pass.\n\n"
    "The UNet part only (like LoraLoaderModelOnly). In the mask preview LoRA 1 is red, LoRA 2 blue.")


def lag_lora() -> Workflow:
    return two_loras_lag(
        "perres_lag_lora", CHECKPOINT, 512, (LORA_A, LORA_B),
        "a photo of ohwx woman and zkz man sitting on a park bench, autumn leaves", "perres/lag_lora",
        "## LAG for any LoRA\n\n" + LAG_LORA_NOTE.format(family="SD1.5"))


def sdxl_lag_lora() -> Workflow:
    return two_loras_lag(
        "perres_sdxl_lag_lora", SDXL_CHECKPOINT, 1024, (SDXL_LORA_A, SDXL_LORA_B),
        "a photo of ohwx woman and zkz man sitting on a park bench, autumn leaves", "perres/sdxl_lag_lora",
        "## LAG for any SDXL LoRA\n\n" + LAG_LORA_NOTE.format(family="SDXL-family (SDXL, Pony, Illustrious, "
                                                                   "NoobAI)") +
        " SDXL's label_emb (pooled text and size) has no image locations and stays the base model's.",
        SDXL_SAMPLER)


# Any two character LoRAs of the user's for each DiT family (trained on Krea 2 RAW, they run on Turbo too).
ANIMA_LORA_A, ANIMA_LORA_B = "character_a_anima.safetensors", "character_b_anima.safetensors"
KREA2_LORA_A, KREA2_LORA_B = "character_a_krea2.safetensors", "character_b_krea2.safetensors"
DIT_LAG_NOTE = (
    "Each block's own text attention makes the masks in the same sampling pass ({attention}), so nothing is "
    "drawn and nothing runs twice. {text}Timestep modulation{extra} has no image locations and stays the base "
    "model's; the node says so when a LoRA changes it.")


def anima_lag_lora() -> Workflow:
    return two_loras_lag(
        "perres_anima_lag_lora", "", 1024, (ANIMA_LORA_A, ANIMA_LORA_B),
        "a photo of ohwx woman and zkz man sitting on a park bench, autumn leaves", "perres/anima_lag_lora",
        "## LAG for any Anima LoRA\n\n" + LAG_LORA_NOTE.format(family="Anima").replace("UNet", "DiT") + "\n\n" +
        DIT_LAG_NOTE.format(attention="its cross-attention to the T5-aligned text tokens", text="",
                            extra=" and the LLM adapter"),
        ANIMA_SAMPLER, diffusion_model_loaders(ANIMA_MODEL, "default", ANIMA_TEXT_ENCODER, "stable_diffusion"))


def krea2_lag_lora() -> Workflow:
    return two_loras_lag(
        "perres_krea2_lag_lora", "", 1024, (KREA2_LORA_A, KREA2_LORA_B),
        "a photo of ohwx woman and zkz man sitting on a park bench, autumn leaves", "perres/krea2_lag_lora",
        "## LAG for any Krea 2 LoRA, on Turbo\n\n" + LAG_LORA_NOTE.format(family="Krea 2").replace("UNet", "DiT") +
        "\n\n" + DIT_LAG_NOTE.format(
            attention="the image-query × text-key part of the joint attention",
            text="The prompt's text tokens take each LoRA's change in full, as the LoRA learned it. ",
            extra=" and the text-fusion blocks"),
        KREA2_TURBO_SAMPLER, diffusion_model_loaders(KREA2_TURBO, "fp8_e4m3fn", KREA2_TEXT_ENCODER, "krea2"))


WORKFLOWS = [train_and_sample, sdxl_train_and_sample, anima_train_and_sample, krea2_train_and_sample,
             suggest_class_word, train_with_masks, continue_training,
             compare_snapshots, load_and_apply, lag_sampling, normal_vs_lag, two_concepts_lag, lag_lora,
             sdxl_lag_sampling, sdxl_lag_lora, anima_lag_lora, krea2_lag_lora]


# --------------------------------------------------------------------------------------------------
# Node definitions, as GET /object_info reports them
# --------------------------------------------------------------------------------------------------
def node_info(class_type: str) -> dict:
    """The /object_info entry of a node (server.py node_info), for V1 and V3 nodes alike."""
    import nodes
    from comfy_api.internal import _ComfyNodeInternal

    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    if issubclass(cls, _ComfyNodeInternal):
        return cls.GET_NODE_INFO_V1()
    inputs = cls.INPUT_TYPES()
    return {"input": inputs, "input_order": {key: list(value.keys()) for key, value in inputs.items()},
            "output": list(cls.RETURN_TYPES), "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))}


def display_name(class_type: str, info: dict) -> str:
    import nodes

    return info.get("display_name") or nodes.NODE_DISPLAY_NAME_MAPPINGS.get(class_type, class_type)


def ordered_inputs(info: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) for every visible input, in the order the frontend creates them."""
    result = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(specs)):
            result.append((name, list(specs[name]), section == "optional"))
    return result


def input_type(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def is_widget(spec: list) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return input_type(spec) in WIDGET_TYPES and not options.get("forceInput", False)


def has_control_widget(name: str, spec: list) -> bool:
    """The frontend's rule: control_after_generate if given, else true for inputs named seed / noise_seed."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if input_type(spec) != "INT":
        return False
    flag = options.get("control_after_generate")
    return bool(flag) if flag is not None else name in SEED_NAMES


def default_value(spec: list):
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    if isinstance(spec[0], list):
        return spec[0][0] if spec[0] else None
    if spec[0] == "COMBO":
        return (options.get("options") or [None])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(spec[0])


# --------------------------------------------------------------------------------------------------
# Building both formats
# --------------------------------------------------------------------------------------------------
def node_size(node: Node, info: Optional[dict]) -> list[float]:
    if node.size:
        return list(node.size)
    if info is None:
        return [360, 200]
    entries = ordered_inputs(info)
    widgets = sum(1 + has_control_widget(n, s) for n, s, _ in entries if is_widget(s))
    sockets = max(sum(not is_widget(s) for _, s, _ in entries), len(info["output"]))
    multiline = sum(1 for _, s, _ in entries if is_widget(s) and len(s) > 1 and s[1].get("multiline"))
    return [360 if multiline else 320, 46 + 22 * sockets + 26 * widgets + 110 * multiline]


def input_slots(node: Node, info: dict) -> list[str]:
    """The node's input sockets in the UI file: every non-widget input, then the widgets fed by a link."""
    entries = ordered_inputs(info)
    return ([n for n, s, _ in entries if not is_widget(s)]
            + [n for n, s, _ in entries if is_widget(s) and n in node.links])


def topological_order(wf: Workflow) -> dict[int, int]:
    pending = {n.id: {src for src, _ in n.links.values()} for n in wf.nodes}
    order: dict[int, int] = {}
    while pending:
        ready = sorted(i for i, deps in pending.items() if deps <= set(order))
        if not ready:
            raise ValueError(f"{wf.name}: the graph has a cycle")
        for i in ready:
            order[i] = len(order)
            del pending[i]
    return order


def build(wf: Workflow) -> tuple[dict, dict]:
    by_id = {n.id: n for n in wf.nodes}
    if len(by_id) != len(wf.nodes):
        raise ValueError(f"{wf.name}: duplicate node ids")
    infos = {n.id: (None if n.type in VIRTUAL_TYPES else node_info(n.type)) for n in wf.nodes}
    order = topological_order(wf)

    # links, numbered in node order then input order
    links, link_of_input, links_from = [], {}, {}
    for node in sorted(wf.nodes, key=lambda n: order[n.id]):
        info = infos[node.id]
        if info is None:
            continue
        for name, spec, _ in ordered_inputs(info):
            if name not in node.links:
                continue
            src, slot = node.links[name]
            src_info = infos[src]
            src_type = src_info["output"][slot]
            if src_type != input_type(spec) and input_type(spec) != "*":
                raise ValueError(f"{wf.name}: {by_id[src].type}[{slot}] is {src_type}, {node.type}.{name} wants "
                                 f"{input_type(spec)}")
            link_id = len(links) + 1
            target_slot = input_slots(node, info).index(name)
            links.append([link_id, src, slot, node.id, target_slot, src_type])
            link_of_input[(node.id, name)] = link_id
            links_from.setdefault((src, slot), []).append(link_id)
        unknown = set(node.links) - {n for n, _, _ in ordered_inputs(info)}
        unknown |= set(node.values) - {n for n, _, _ in ordered_inputs(info)}
        if unknown:
            raise ValueError(f"{wf.name}: {node.type} has no inputs {sorted(unknown)}")

    ui_nodes, api = [], {}
    for node in wf.nodes:
        info = infos[node.id]
        ui = {"id": node.id, "type": node.type, "pos": list(node.pos), "size": node_size(node, info), "flags": {},
              "order": order[node.id], "mode": 0, "inputs": [], "outputs": [], "properties": {}}
        if node.title:
            ui["title"] = node.title
        if info is None:  # a note
            ui["widgets_values"] = [node.values["text"]]
            ui["color"], ui["bgcolor"] = "#432", "#653"
            ui_nodes.append(ui)
            continue
        ui["properties"] = {"Node name for S&R": node.type}
        api_inputs, widgets, widget_sockets = {}, [], []
        for name, spec, optional in ordered_inputs(info):
            linked = name in node.links
            if is_widget(spec):
                value = node.values[name] if name in node.values else default_value(spec)
                widgets.append(value)
                if has_control_widget(name, spec):
                    widgets.append("fixed")
                api_inputs[name] = value
                if linked:  # the frontend keeps the widget's value and feeds the input from the link
                    widget_sockets.append({"name": name, "type": input_type(spec), "widget": {"name": name},
                                           "link": link_of_input[(node.id, name)]})
                    src, slot = node.links[name]
                    api_inputs[name] = [str(src), slot]
            else:
                entry = {"name": name, "type": input_type(spec), "link": link_of_input.get((node.id, name))}
                if optional:
                    entry["shape"] = 7  # the frontend's hollow dot for optional inputs
                ui["inputs"].append(entry)
                if linked:
                    src, slot = node.links[name]
                    api_inputs[name] = [str(src), slot]
        ui["inputs"].extend(widget_sockets)
        for slot, (out_type, out_name) in enumerate(zip(info["output"], info["output_name"])):
            ui["outputs"].append({"name": out_name, "type": out_type, "links": links_from.get((node.id, slot), []),
                                  "slot_index": slot})
        if widgets:
            ui["widgets_values"] = widgets
        ui_nodes.append(ui)
        api[str(node.id)] = {"class_type": node.type, "inputs": api_inputs,
                             "_meta": {"title": node.title or display_name(node.type, info)}}

    groups = []
    for index, group in enumerate(wf.groups, start=1):
        boxes = [(by_id[i].pos, next(u["size"] for u in ui_nodes if u["id"] == i)) for i in group.members]
        x0 = min(p[0] for p, _ in boxes) - 20
        y0 = min(p[1] for p, _ in boxes) - 80  # the node titles (30 px) and the group's title bar (34 px)
        x1 = max(p[0] + s[0] for p, s in boxes) + 20
        y1 = max(p[1] + s[1] for p, s in boxes) + 20
        groups.append({"id": index, "title": group.title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                       "color": group.color, "font_size": 24, "flags": {}})

    ui_workflow = {
        "last_node_id": max(by_id), "last_link_id": len(links),
        "nodes": sorted(ui_nodes, key=lambda u: u["id"]), "links": links, "groups": groups, "config": {},
        "extra": {"ds": {"scale": 0.75, "offset": [80, 120]}}, "version": 0.4,
    }
    return ui_workflow, dict(sorted(api.items(), key=lambda kv: int(kv[0])))


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def main(argv: Optional[list[str]] = None) -> None:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from comfy_host import start_host_for_tool

    start_host_for_tool(__doc__.split("\n")[0], "perres-workflows-", argv)
    os.makedirs(os.path.join(OUT_DIR, "api"), exist_ok=True)
    for make in WORKFLOWS:
        wf = make()
        ui, api = build(wf)
        write_json(os.path.join(OUT_DIR, wf.name + ".json"), ui)
        write_json(os.path.join(OUT_DIR, "api", wf.name + ".json"), api)
        log.info("wrote %s (%d nodes, %d links)", wf.name, len(ui["nodes"]), len(ui["links"]))


if __name__ == "__main__":
    main()
