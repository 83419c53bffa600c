"""PerRes Train Residuals: learn ΔW_i = A_i·B_i for the residual layers of a frozen denoiser: the proj_out layers of
an SD1.x or SDXL UNet, the block output layers of an Anima or Krea 2 DiT (perres_core.families)."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from typing import Iterator, Optional

import torch

from comfy_api.latest import io

from .host.entry_points import comfy  # the host's modules, imported and checked in one place
from ..perres_core.errors import PerResError
from ..perres_core.families import ModelFamily
from ..perres_core.buckets import CROPS, ImageBucket, bucket_images, check_crop, describe_buckets
from ..perres_core.images import matched_masks
from ..perres_core.preview import DEFAULT_PREVIEW_EVERY
from ..perres_core.residual import (DEFAULT_RANK_RATIO, ConceptInfo, ResidualSet, check_continuable, rank_for,
                                    steps_trained, training_date)
from ..perres_core.training import LatentBucket, TrainSettings, loss_weights
from .node_guard import guarded
from .host.model import require_trainable, unet_config_of, with_residual_weights
from .host.text_tokens import check_concept_word, word_token_ids
from .host.training import caption_conditioning, encode_images, train_on_model
from .image_lists import CROP_TOOLTIP, images_of, single_values
from .node_warnings import NodeWarnings, node_id_of
from .train_monitor import TrainingMonitor
from .types import LossMap, Residuals

log = logging.getLogger("perres")
NAME = "PerRes Train Residuals"
# On by default: without it, 512 px at batch 4 keeps every UNet activation for the backward pass, far more
# than the 6–12 GB cards SD1.5 users own (docs/benchmarks.md has the measurements).
CHECKPOINTING_DEFAULT = True
CHECKPOINTING_TOOLTIP = ("Recompute the UNet's activations during the backward pass instead of keeping them: "
                         "much less memory for somewhat more time per step. On by default so the paper's "
                         "512 px, batch 4 fits 8 GB cards; turn it off on a large GPU for speed.")
# Without masks nothing changes (the paper's loss). With masks, a little weight keeps the background from
# being ignored outright; 0 ignores it, 1 is the plain loss again.
BACKGROUND_WEIGHT_DEFAULT = 0.1


# resolution 0 (the default) trains at the family's own resolution (512 for SD1.x, 1024 for SDXL)
AUTO_RESOLUTION = 0


def check_numbers(steps: int, batch_size: int, learning_rate: float, rank_ratio: float, resolution: int,
                  preview_every: int = 0, snapshot_every: int = 0) -> None:
    TrainSettings(steps=steps, batch_size=batch_size, learning_rate=learning_rate).validate()
    for name, value in (("preview_every", preview_every), ("snapshot_every", snapshot_every)):
        if not isinstance(value, int) or value < 0:
            raise PerResError(f"{name} must be 0 (off) or a number of steps, got {value}.")
    rank_for(320, rank_ratio)  # raises for ratios outside (0, 1]
    if resolution != AUTO_RESOLUTION and (resolution % 8 or resolution < 64):
        raise PerResError(f"resolution must be a multiple of 8 and at least 64 (or 0 for the model's own: 512 for "
                          f"SD1.x, 1024 for SDXL, Anima and Krea 2), got {resolution}.")


def training_resolution(resolution: int, family: ModelFamily, warnings: NodeWarnings) -> int:
    """The resolution to train at: the family's own for 0; a warning when it is well below that."""
    if resolution == AUTO_RESOLUTION:
        return family.resolution
    if resolution < family.low_resolution_warning:
        warnings.warn(f"training {family.name} at {resolution} px; {family.name} models are trained at "
                      f"{family.resolution} px, and a residual learned far below that draws the concept worse at "
                      f"{family.resolution}. Set resolution to 0 ({family.resolution} px) unless memory is short.")
    return resolution


class TrainResiduals(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerResTrainResiduals",
            display_name=NAME,
            category="PerRes",
            description="Learns personalized residuals (Ham et al. 2024) for a frozen model from a few reference "
                        "images, with the caption 'a photo of a <identifier> <class word>': on the proj_out layers "
                        "of an SD1.x UNet (16 layers) or SDXL-family UNet (11), on the block output layers of an "
                        "Anima (84) or Krea 2 (56) diffusion transformer. No regularization images; the text "
                        "encoder is not trained.",
            inputs=[
                io.Model.Input("model", tooltip="A frozen SD1.x or SDXL-family model (ε- or v-prediction), or an Anima "
                                                "or Krea 2 diffusion model (fp8 weights train too); it is never "
                                                "modified."),
                io.Clip.Input("clip", tooltip="Encodes the training caption: the checkpoint's CLIP, or the DiT's own "
                                              "text encoder (Anima: Qwen3-0.6B; Krea 2: Qwen3-VL-4B, type krea2)."),
                io.Vae.Input("vae", tooltip="Encodes the reference images to latents (once): the checkpoint's VAE, or "
                                            "the Wan 2.1 VAE for Anima and Krea 2."),
                io.Image.Input("images", tooltip="Reference images of the concept (3–20 work best): one batch, "
                                                  "or a list of images of any sizes."),
                io.String.Input("identifier", default="sks",
                                tooltip="A rare single-token word that will name the concept (V* in the paper)."),
                io.String.Input("class_word", default="dog",
                                tooltip="The concept's broad class, e.g. dog, cat, toy, car, person."),
                io.Int.Input("steps", default=150, min=1, max=100000, tooltip="Optimizer steps (paper: 150)."),
                io.Int.Input("batch_size", default=4, min=1, max=64,
                             tooltip="Images per step (paper: 4); drawn with replacement if there are fewer images."),
                io.Float.Input("learning_rate", default=1e-3, min=1e-7, max=1.0, step=1e-5, round=False,
                               tooltip="AdamW learning rate (paper: 0.001)."),
                io.Float.Input("rank_ratio", default=DEFAULT_RANK_RATIO, min=0.001, max=1.0, step=0.005,
                               tooltip="The residual's size. UNets: rank r_i = ratio × channels of each layer (paper: "
                                       "0.05 → 1.24M parameters on SD1.5, 1.19M on SDXL). DiTs: 0.05 keeps the "
                                       "paper's share of the model (Anima 3.1M, r = 6; Krea 2 18.5M, r = 19); "
                                       "twice the ratio, twice the parameters."),
                io.Int.Input("resolution", default=AUTO_RESOLUTION, min=0, max=2048, step=8,
                             tooltip="Training resolution: the side of the square (crop center) or of the square "
                                     "whose area the buckets keep (crop buckets). 0: the model's own (512 for "
                                     "SD1.x, 1024 for SDXL, Anima and Krea 2)."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Seeds initialisation, batches, timesteps and noise; same seed, same result."),
                io.Combo.Input("init", options=["random", "zero"], default="random",
                               tooltip="random: both factors N(0, 0.01²) as in the paper. zero: ΔW starts at exactly "
                                       "0."),
                io.Boolean.Input("gradient_checkpointing", default=CHECKPOINTING_DEFAULT, optional=True,
                                 tooltip=CHECKPOINTING_TOOLTIP),
                io.Mask.Input("masks", optional=True,
                              tooltip="Optional subject masks, one per image (or one for all): 1 on the concept, 0 "
                                      "on the background, e.g. PerRes Load Concept Images' masks (from alpha) or "
                                      "any masking node. Without masks every pixel counts (the paper's loss)."),
                io.Float.Input("background_weight", default=BACKGROUND_WEIGHT_DEFAULT, min=0.0, max=1.0, step=0.01,
                               optional=True,
                               tooltip="With masks: the loss weight of background pixels (the subject's is 1). 0 "
                                       "ignores the background, 1 is the plain loss. Unused without masks."),
                io.Boolean.Input("invert_masks", default=False, optional=True,
                                 tooltip="Turn on when the masks are 1 on the background, e.g. the stock Load "
                                         "Image's mask of a cut-out (it is 1 where the image is transparent)."),
                Residuals.Input("initial_residuals", optional=True,
                                tooltip="Optional: continue training these residuals (PerRes Load Residuals) instead "
                                        "of starting afresh. Their ranks must match rank_ratio; init is unused."),
                io.Combo.Input("crop", options=list(CROPS), default="center", optional=True, tooltip=CROP_TOOLTIP),
                io.Int.Input("preview_every", default=DEFAULT_PREVIEW_EVERY, min=0, max=100000, optional=True,
                             tooltip="Show a preview on the node every this many steps (and at the first and last): "
                                     "the model's reconstruction of the first reference image from fixed noise, "
                                     "which turns into the concept as it is learned. 0 turns it off; ComfyUI's "
                                     "preview setting (none / latent2rgb / taesd) applies."),
                io.Int.Input("snapshot_every", default=0, min=0, max=100000, optional=True,
                             tooltip="Also save the residual every this many steps, as "
                                     "models/loras/<snapshot_prefix>_step00050_00001.safetensors etc., to keep a "
                                     "good step when a later one over-fits. 0: no snapshots. The snapshots "
                                     "output lists them (and the final residual) for sampling side by side."),
                io.String.Input("snapshot_prefix", default="perres/snapshots/concept", optional=True,
                                tooltip="Path under models/loras for the snapshots; the step and a counter are "
                                        "appended, existing files are never overwritten."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The input model with the trained residual applied."),
                Residuals.Output(display_name="residuals", tooltip="The trained residuals, for Save or LAG."),
                LossMap.Output(display_name="loss", tooltip="Loss per step, for the stock Plot Loss Graph node."),
                Residuals.Output(display_name="snapshots", is_output_list=True,
                                 tooltip="Every snapshot (snapshot_every), then the final residual: a list, so a node "
                                         "connected to it runs once per snapshot (e.g. Apply + KSampler with one "
                                         "seed, to compare the steps side by side). Just the final residual "
                                         "without snapshots."),
            ],
            hidden=[io.Hidden.unique_id],  # to show warnings and progress on the node
            # Every input arrives as a list, so `images` may be a list of batches of different sizes (Load
            # Concept Images with crop 'buckets', the stock Load Image Dataset from Folder); the node runs once.
            is_input_list=True,
        )

    @classmethod
    @guarded
    def execute(cls, **inputs) -> io.NodeOutput:
        # is_input_list: every input is a list; images and masks may hold several batches, the rest one value
        images, masks = images_of(inputs.pop("images")), inputs.pop("masks", None)
        return cls.train(images, masks, **single_values(inputs))

    @classmethod
    def train(cls, images: list[torch.Tensor], masks: Optional[list[torch.Tensor]], model, clip, vae,
              identifier: str, class_word: str, steps: int, batch_size: int, learning_rate: float,
              rank_ratio: float, resolution: int, seed: int, init: str,
              gradient_checkpointing: bool = CHECKPOINTING_DEFAULT,
              background_weight: float = BACKGROUND_WEIGHT_DEFAULT, invert_masks: bool = False,
              initial_residuals: Optional[ResidualSet] = None, crop: str = "center",
              preview_every: int = DEFAULT_PREVIEW_EVERY, snapshot_every: int = 0,
              snapshot_prefix: str = "perres/snapshots/concept") -> io.NodeOutput:
        check_numbers(steps, batch_size, learning_rate, rank_ratio, resolution, preview_every, snapshot_every)
        check_crop(crop)
        family, schedule = require_trainable(model)
        identifier = check_concept_word("identifier", identifier, single_word=True)
        class_word = check_concept_word("class_word", class_word, single_word=False)
        warnings = NodeWarnings(NAME, node_id_of(cls))
        resolution = training_resolution(resolution, family, warnings)
        if len(word_token_ids(clip, identifier)) > 1:
            warnings.warn(f"identifier '{identifier}' is split into several tokens; a rare word that this text "
                          "encoder reads as one token (such as 'sks' for the CLIP of SD1.x and SDXL) binds the concept "
                          "more cleanly.")
        if not images:
            raise PerResError("no reference images were given; connect 'PerRes Load Concept Images' "
                              "with a folder of 3–20 photos of the concept.")
        if len(images) < batch_size:
            warnings.warn(f"{len(images)} image(s) for batch size {batch_size}; batches are drawn with "
                          "replacement.")
        per_image_masks = None
        if masks:
            per_image_masks = matched_masks(masks, [tuple(image.shape[:2]) for image in images],
                                            invert=invert_masks)
            if sum(1 if mask.dim() == 2 else mask.shape[0] for mask in masks) == 1 and len(images) > 1:
                warnings.warn(f"one mask for {len(images)} images; it weights every image the same way.")
        image_buckets = bucket_images(images, resolution, crop, per_image_masks)
        if crop == "buckets":
            warnings.show_result(f"buckets (width×height): {describe_buckets(image_buckets)}")
        concept = ConceptInfo(identifier, class_word)
        previous_steps = 0
        if initial_residuals is not None:
            check_continuable(initial_residuals, ResidualSet.for_family(family, rank_ratio, unet_config_of(model)))
            previous_steps = continued_steps(initial_residuals, concept, warnings)
            concept = replace(concept, caption_template=initial_residuals.concept.caption_template)
        latent_buckets = [latent_bucket(bucket, model, clip, vae, concept.caption(), background_weight)
                          for bucket in image_buckets]
        record = {"steps": previous_steps + steps, "batch_size": batch_size, "learning_rate": learning_rate,
                  "seed": seed, "init": init if initial_residuals is None else "continued",
                  "resolution": resolution, "num_images": len(images), "prediction": schedule.prediction}
        if crop == "buckets":
            record["crop"] = "buckets"
            record["buckets"] = describe_buckets(image_buckets)
        if initial_residuals is not None:
            record["continued_from_steps"] = previous_steps
        if masks:
            record["background_weight"] = background_weight

        with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; these must train
            if initial_residuals is None:
                residuals = ResidualSet.for_family(family, rank_ratio, unet_config_of(model), concept=concept,
                                                   training=record)
                residuals.initialize(init, seed)
            else:  # a copy: the input residuals (and their file) are never changed
                residuals = replace(initial_residuals.detached_copy(), concept=concept, training=record,
                                    rank_ratio=rank_ratio, date=training_date())
        monitor = TrainingMonitor(model, residuals, steps, previous_steps, preview_every, snapshot_every,
                                  snapshot_prefix, warnings)
        comfy.model_management.throw_exception_if_processing_interrupted()
        settings = TrainSettings(steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                                 start_step=previous_steps)
        with snapshots_kept_on_failure(monitor, warnings):
            losses = train_on_model(model, latent_buckets, residuals, settings, monitor,
                                    gradient_checkpointing=gradient_checkpointing)
        trained = residuals.detached_copy()
        log.info("%s: %d steps%s, final loss %.4f, %d parameters.", NAME, steps,
                 f" (continued from {previous_steps})" if initial_residuals is not None else "", losses[-1],
                 trained.parameter_count())
        return io.NodeOutput(with_residual_weights(model, trained, 1.0), trained, {"loss": losses},
                             monitor.output_list(trained))


def latent_bucket(bucket: ImageBucket, model, clip, vae, caption: str, background_weight: float) -> LatentBucket:
    """One bucket's VAE latents, the caption conditioned on its size (SDXL's size embedding) and its loss weights."""
    latents = encode_images(vae, bucket.pixels, model)
    weights = None if bucket.masks is None else \
        loss_weights(bucket.masks, tuple(latents.shape[-2:]), background_weight)
    height, width = bucket.size
    return LatentBucket(latents, caption_conditioning(model, clip, caption, width, height), weights)


@contextlib.contextmanager
def snapshots_kept_on_failure(monitor: TrainingMonitor, warnings: NodeWarnings) -> Iterator[None]:
    """A cancelled or failed run says which snapshots it wrote; they are never removed."""
    try:
        yield
    except comfy.model_management.InterruptProcessingException:
        kept = monitor.kept_snapshots()
        if kept:
            log.warning("%s: cancelled; %s.", NAME, kept)
            warnings.show_result(f"Cancelled: {kept}.")
        raise
    except Exception as exc:
        kept = monitor.kept_snapshots()
        if kept is None:
            raise
        raise PerResError(f"{exc} Only the snapshots survive the failure: {kept}.") from exc


def continued_steps(initial: ResidualSet, concept: ConceptInfo, warnings: NodeWarnings) -> int:
    """The steps `initial` was trained for (0 with a warning if its metadata lacks them); warns when this run
    trains other words than the residual's."""
    if initial.concept.concept_words() != concept.concept_words():
        warnings.warn(f"initial_residuals were trained as '{' '.join(initial.concept.concept_words())}'; this run "
                      f"trains '{' '.join(concept.concept_words())}' and the result carries these words. Use the "
                      "residual's identifier and class word to continue the same concept.")
    previous = steps_trained(initial)
    if previous is None:
        warnings.warn("initial_residuals do not record how many steps they were trained; the saved step count "
                      "covers this run only.")
        return 0
    return previous
