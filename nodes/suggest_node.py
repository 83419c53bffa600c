"""PerRes Suggest Class Word: rank candidate class words with the frozen model as a diffusion classifier."""
from __future__ import annotations

import logging

import torch

from comfy_api.latest import io, ui

from .host.entry_points import comfy  # the host's modules, imported and checked in one place
from ..perres_core.class_words import (DEFAULT_BUDGET, DEFAULT_CANDIDATE_TEXT, Ranking, TrialSchedule, caption_for,
                                       check_budget, parse_candidates, rank_candidates)
from ..perres_core.diffusion import Conditioning
from ..perres_core.errors import PerResError
from ..perres_core.images import prepare_batch
from .node_guard import guarded
from .image_lists import images_of, single_values
from .host.model import diffusion_schedule, require_trainable, resident_clone
from .host.training import caption_conditioning, denoiser_prediction, encode_images, model_latents, training_dtype
from .node_warnings import NodeWarnings, node_id_of

log = logging.getLogger("perres")
NAME = "PerRes Suggest Class Word"
# ε evaluations per UNet call at most; fewer when the host's own memory estimate says they do not fit.
MAX_CHUNK = 32
# 512 px is what SD1.x was trained at and what PerRes trains at: the classifier should judge the images at
# the resolution the class word will be trained at. The cost ratio to training stays the same at any size.
DEFAULT_RESOLUTION = 512


def chunk_size(patcher, latent_shape: tuple[int, ...]) -> int:
    """How many samples one UNet call takes: the host sampler's rule (estimate × 1.5 < free memory)."""
    free = comfy.model_management.get_free_memory(patcher.load_device)
    size = MAX_CHUNK
    while size > 1 and patcher.model.memory_required([size, *latent_shape[1:]]) * 1.5 >= free:
        size //= 2
    return size


def rank_on_model(model, latents: torch.Tensor, conditioning: Conditioning, words: list[str], budget: int, seed: int,
                  on_progress) -> Ranking:
    """Rank `words` on a loaded copy of `model` (the copy training runs on); latents are VAE latents (unscaled)."""
    patcher = resident_clone(model)
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    x0 = model_latents(patcher.model, latents).cpu()
    schedule = diffusion_schedule(patcher)
    trials = TrialSchedule.draw(tuple(x0.shape), budget, schedule.num_timesteps, seed)
    return rank_candidates(denoiser_prediction(patcher.model), x0, conditioning.cpu_float(), words, schedule,
                           trials, chunk_size(patcher, tuple(x0.shape)), on_progress,
                           device=patcher.load_device, dtype=training_dtype(patcher.model))


class SuggestClassWord(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerResSuggestClassWord",
            display_name=NAME,
            category="PerRes",
            description="Ranks candidate class words for the reference images with the frozen model itself, as a "
                        "diffusion classifier (Li et al. 2023): the caption 'a photo of a <word>' with which the "
                        "model predicts the noise best, at the same timesteps and noise for every word, wins. "
                        "Wire `class_word` into PerRes Train Residuals.",
            inputs=[
                io.Model.Input("model", tooltip="The model you will train on (SD1.x, SDXL family, Anima or Krea 2); it "
                                                "is never modified."),
                io.Clip.Input("clip", tooltip="Encodes 'a photo of a <word>' for every candidate."),
                io.Vae.Input("vae", tooltip="Encodes the reference images to latents (once)."),
                io.Image.Input("images", tooltip="The reference images you will train on."),
                io.String.Input("candidates", default=DEFAULT_CANDIDATE_TEXT, multiline=True,
                                tooltip="Class words to compare, separated by commas or new lines (1–3 words "
                                        "each). Add the words you are unsure between."),
                io.Int.Input("budget", default=DEFAULT_BUDGET, min=1, max=1000,
                             tooltip="Timesteps per image for the best 5 words; every word is first screened with "
                                     "a quarter of them. More is surer and slower."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Seeds the timesteps and noise (the same for every word); same seed, same "
                                     "ranking."),
                io.Int.Input("resolution", default=DEFAULT_RESOLUTION, min=64, max=2048, step=8,
                             tooltip="Images are centre-cropped and resized to it; use your training resolution."),
            ],
            outputs=[
                io.String.Output(display_name="class_word", tooltip="The best candidate, for PerRes Train Residuals' "
                                                                     "class_word."),
                io.String.Output(display_name="ranking", tooltip="Every candidate with its score, best first."),
            ],
            hidden=[io.Hidden.unique_id],  # to show the ranking on the node
            is_output_node=True,  # runs on its own too, to just look at the ranking
            # images may be a list of batches of different sizes (Load Concept Images with crop 'buckets'):
            # the node ranks once for all of them
            is_input_list=True,
        )

    @classmethod
    @guarded
    def execute(cls, **inputs) -> io.NodeOutput:
        images = images_of(inputs.pop("images"))
        return cls.suggest(images, **single_values(inputs))

    @classmethod
    def suggest(cls, images: list[torch.Tensor], model, clip, vae, candidates: str, budget: int, seed: int,
                resolution: int) -> io.NodeOutput:
        words = parse_candidates(candidates)
        check_budget(budget)
        require_trainable(model)
        if not images:
            raise PerResError("no reference images were given; connect the images you will train on "
                              "(e.g. from 'PerRes Load Concept Images').")
        pixels = prepare_batch(images, resolution)
        latents = encode_images(vae, pixels, model)
        conditioning = Conditioning.cat([caption_conditioning(model, clip, caption_for(word), resolution,
                                                              resolution) for word in words])
        progress = comfy.utils.ProgressBar(1)

        def on_progress(done: int, total: int) -> None:
            progress.update_absolute(done, total)
            comfy.model_management.throw_exception_if_processing_interrupted()

        comfy.model_management.throw_exception_if_processing_interrupted()
        ranking = rank_on_model(model, latents, conditioning, words, budget, seed, on_progress)
        notes = NodeWarnings(NAME, node_id_of(cls))
        if ranking.is_close_call():
            runner_up = ranking.entries[1].word
            notes.warn(f"'{ranking.best}' and '{runner_up}' are within two standard errors of each other; "
                       f"raise the budget to tell them apart, or choose the one that describes the concept.")
        text = ranking.as_text()
        notes.show_result(text)
        log.info("%s: %s", NAME, text.replace("\n", "; "))
        return io.NodeOutput(ranking.best, text, ui=ui.PreviewText(text))
