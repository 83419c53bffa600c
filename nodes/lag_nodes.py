"""LAG sampling nodes: single and multi-concept LAG (PerRes residuals and any LoRA of the model's family), the mask
preview."""
from __future__ import annotations

import torch

from comfy_api.latest import io, ui

from ..perres_core.errors import PerResError
from ..perres_core.lag import THRESHOLD_MODES, MaskSettings
from ..perres_core.residual import ResidualSet
from ..perres_core.tokens import concept_positions
from .file_nodes import lora_file_list
from .node_guard import guarded
from .host.lag_concepts import ConceptSpec, load_lora_file, lora_deltas, residual_deltas
from .host.lag_patch import LagConcept, LagPatch
from .host.model import family_of_model, require_fits, unet_config_of
from .host.text_tokens import check_concept_word, prompt_token_chunks, word_spellings
from .node_warnings import NodeWarnings, node_id_of
from .types import Concepts, Residuals

LAG_NAME = "PerRes LAG Sampling"
CONCEPT_NAME = "PerRes LAG Concept"
LORA_NAME = "PerRes LAG LoRA"
PREVIEW_NAME = "PerRes LAG Mask Preview"
OUTSIDE = {"full residual": "full", "base model": "base"}
# colours of concepts 1, 2, 3, ... in the mask preview
PALETTE = torch.tensor([[1.0, 0.25, 0.2], [0.2, 0.6, 1.0], [0.3, 0.9, 0.3], [1.0, 0.85, 0.2], [0.8, 0.3, 1.0]])


def parse_concept_words(text: str, residuals: ResidualSet) -> list[str]:
    """Comma-separated override, or the identifier and class word stored with the residual."""
    if not text.strip():
        return residuals.concept.concept_words()
    return [check_concept_word("concept word", word, single_word=False) for word in text.split(",") if word.strip()]


def locate_concept(clip, chunks: list[list[int]], words: list[str], warnings: NodeWarnings,
                   key: str | None = None, offset: int = 0) -> list[int]:
    """The words' positions among the denoiser's text tokens: in the tokenizer output `key`, less the `offset`
    opening tokens the text encoder drops."""
    found, missing = concept_positions(chunks, {w: word_spellings(clip, w, key) for w in words})
    positions = [p - offset for p in found if p >= offset]
    if missing:
        fallback = "" if positions else " None of its words occur, so this concept is applied everywhere (normal sampling)."
        warnings.warn(f"{', '.join(repr(m) for m in missing)} not in the prompt.{fallback} Put the concept words "
                      f"(e.g. '{' '.join(words)}') in the prompt.")
    return positions


class LagConceptNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerResLAGConcept",
            display_name=CONCEPT_NAME,
            category="PerRes",
            description="Adds one more concept for multi-concept LAG: its residual acts only where its own words attend.",
            inputs=[
                Residuals.Input("residuals", tooltip="The additional concept's residuals."),
                io.String.Input("concept_words", default="",
                                tooltip="Comma-separated words of this concept in the prompt; empty = identifier and "
                                        "class word stored with the residual."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05, tooltip="Residual strength."),
                Concepts.Input("concepts", optional=True, tooltip="Chain further concepts here."),
            ],
            outputs=[Concepts.Output(display_name="concepts", tooltip="The chain so far plus this concept.")],
        )

    @classmethod
    @guarded
    def execute(cls, residuals: ResidualSet, concept_words: str, strength: float, concepts=None) -> io.NodeOutput:
        words = parse_concept_words(concept_words, residuals)
        return io.NodeOutput(list(concepts or []) + [ConceptSpec(words, strength, residuals=residuals)])


def parse_trigger_words(text: str, lora_name: str) -> list[str]:
    words = [check_concept_word("trigger word", word, single_word=False) for word in text.split(",") if word.strip()]
    if not words:
        raise PerResError(f"trigger_words is empty; write the words that call up '{lora_name}' (comma-separated, as "
                          "they appear in your prompt). LAG applies the LoRA where those words attend.")
    return words


class LagLoraNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerResLAGLoRA",
            display_name=LORA_NAME,
            category="PerRes",
            description="Turns any LoRA of the model's family (SD1.x, SDXL, Anima, Krea 2) into a LAG concept: it acts "
                        "only where its trigger words attend, so two character LoRAs in one prompt stay apart and the "
                        "background stays the base model's. Denoiser only (like LoraLoaderModelOnly); chain into "
                        "PerRes LAG Sampling's extra_concepts.",
            inputs=[
                io.Combo.Input("lora_name", options=lora_file_list(),
                               tooltip="A LoRA (.safetensors, for the family of the model) from models/loras: kohya, diffusers/PEFT, LoCon, "
                                       "LoHa, LoKr or DoRA, read by ComfyUI's own LoRA loader."),
                io.String.Input("trigger_words", default="",
                                tooltip="Comma-separated words of this LoRA in the prompt (its trigger words, and "
                                        "the subject word if you like, e.g. 'ohwx, woman')."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="LoRA strength inside its mask, as strength_model of LoraLoaderModelOnly."),
                Concepts.Input("concepts", optional=True, tooltip="Chain further concepts here."),
            ],
            outputs=[Concepts.Output(display_name="concepts", tooltip="The chain so far plus this LoRA.")],
        )

    @classmethod
    @guarded
    def execute(cls, lora_name: str, trigger_words: str, strength: float, concepts=None) -> io.NodeOutput:
        words = parse_trigger_words(trigger_words, lora_name)
        spec = ConceptSpec(words, strength, lora=load_lora_file(lora_name), lora_name=lora_name)
        return io.NodeOutput(list(concepts or []) + [spec])


class LagSampling(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerResLAGSampling",
            display_name=LAG_NAME,
            category="PerRes",
            description="Localized attention-guided sampling: the residual acts only where the concept words attend "
                        "(cross-attention, per block, binarized at the median); the base model draws the rest. "
                        "Encodes the prompt too: wire 'positive' to the sampler.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SDXL-family, Anima or Krea 2 model (stock LoRAs may already be "
                                        "applied)."),
                io.Clip.Input("clip", tooltip="Tokenizes and encodes the prompt."),
                Residuals.Input("residuals", optional=True,
                                tooltip="From PerRes Train Residuals or PerRes Load Residuals. Optional when "
                                        "extra_concepts brings the concepts (e.g. PerRes LAG LoRA)."),
                io.String.Input("prompt", multiline=True, default="a photo of a sks dog on the beach",
                                tooltip="The positive prompt; it must contain the concept words."),
                io.String.Input("concept_words", default="",
                                tooltip="Comma-separated words; empty = the identifier and class word of the residual."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="Residual strength inside the mask."),
                io.Combo.Input("threshold", options=list(THRESHOLD_MODES), default="median",
                               tooltip="median: top half of each map (paper). quantile: above the quantile below. "
                                       "soft: the map itself, scaled to [0, 1]."),
                io.Float.Input("quantile", default=0.5, min=0.0, max=0.99, step=0.01,
                               tooltip="Only for threshold=quantile: share of each map left to the base model."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress where LAG starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress where LAG ends."),
                io.Combo.Input("outside_window", options=list(OUTSIDE), default="full residual",
                               tooltip="What the steps outside start/end use: the residual everywhere, or the base model."),
                Concepts.Input("extra_concepts", optional=True,
                               tooltip="More concepts from PerRes LAG Concept or PerRes LAG LoRA nodes "
                                       "(multi-concept LAG)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="A patched clone; connect to the sampler."),
                io.Conditioning.Output(display_name="positive", tooltip="The encoded prompt; connect to the sampler."),
            ],
            hidden=[io.Hidden.unique_id],  # to show warnings on the node
        )

    @classmethod
    @guarded
    def execute(cls, model, clip, prompt: str, concept_words: str, strength: float, threshold: str, quantile: float,
                start_percent: float, end_percent: float, outside_window: str, residuals: ResidualSet | None = None,
                extra_concepts=None) -> io.NodeOutput:
        family_of_model(model)
        if not prompt.strip():
            raise PerResError("prompt is empty; write the prompt with the concept words, e.g. 'a photo of a sks dog'.")
        if start_percent > end_percent:
            raise PerResError(f"start_percent ({start_percent}) is after end_percent ({end_percent}); set "
                              "start_percent ≤ end_percent (0 and 1 apply LAG at every step).")
        if outside_window not in OUTSIDE:
            raise PerResError(f"outside_window must be one of {list(OUTSIDE)}.")
        settings = MaskSettings(mode=threshold, quantile=quantile)
        settings.validate()
        specs = list(extra_concepts or [])
        if residuals is not None:
            specs.insert(0, ConceptSpec(parse_concept_words(concept_words, residuals), strength, residuals=residuals))
        if not specs:
            raise PerResError("no concept is connected: connect residuals (PerRes Load Residuals) or "
                              "extra_concepts (PerRes LAG LoRA / PerRes LAG Concept).")
        patched, positive = build_lag_model(model, clip, prompt, specs, settings, start_percent, end_percent,
                                            OUTSIDE[outside_window], node_id=node_id_of(cls))
        return io.NodeOutput(patched, positive)


def concept_of(model, clip, chunks: list[list[int]], spec: ConceptSpec, warnings: NodeWarnings, key: str | None = None,
               offset: int = 0) -> LagConcept:
    """The spec's layer changes on this model, and where its words are among the prompt's text tokens."""
    if spec.residuals is not None:
        deltas = residual_deltas(spec.residuals, spec.strength)
    else:
        deltas, notes = lora_deltas(model, spec.lora, spec.strength, spec.lora_name)
        for note in notes:
            warnings.warn(note)
    return LagConcept(deltas, locate_concept(clip, chunks, spec.words, warnings, key, offset), spec.label)


def build_lag_model(model, clip, prompt: str, specs: list[ConceptSpec], settings: MaskSettings,
                    start_percent: float = 0.0, end_percent: float = 1.0, outside: str = "full",
                    node_id: str | None = None):
    """(patched clone, positive conditioning) for the concepts.

    `node_id` is the LAG Sampling node's id in the prompt, where warnings are shown."""
    family = family_of_model(model)
    for spec in specs:
        if spec.residuals is not None:
            require_fits(model, spec.residuals, f"the residual for '{spec.label}'")
    attention = family.text_attention
    chunks = prompt_token_chunks(clip, prompt, attention.prompt_tokens)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    tokens = sum(len(c) for c in chunks)
    if attention.padded_to:
        # the denoiser's text is one token per prompt token, zero-padded (Anima: the LLM adapter's output, made
        # from the T5 ids when the conditioning is prepared, so the sampler's context is not the encoding)
        offset, length, prompt_context = 0, max(tokens, attention.padded_to), None
    else:
        # the encoding is the denoiser's text; an encoder may drop a template's opening tokens (Krea 2's system
        # prompt): those come first, so the concept positions move back by their number
        length = positive[0][0].shape[1]
        offset, prompt_context = max(0, tokens - length), positive[0][0]
    warnings = NodeWarnings(LAG_NAME, node_id)
    concepts = [concept_of(model, clip, chunks, spec, warnings, attention.prompt_tokens, offset) for spec in specs]
    sampling = model.get_model_object("model_sampling")
    patch = LagPatch(concepts, prompt_length=length, settings=settings,
                     sigma_start=float(sampling.percent_to_sigma(start_percent)),
                     sigma_end=float(sampling.percent_to_sigma(end_percent)), outside=outside,
                     prompt_context=prompt_context, warn=warnings.warn, family=family,
                     depths=family.depths(unet_config_of(model)))
    patched = model.clone()
    patch.install(patched)
    return patched, positive


def preview_images(averages: dict[tuple[int, int], torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """One RGB image per block resolution; each concept in its colour, brightness = share of steps active."""
    images = []
    for (height, width), masks in sorted(averages.items(), reverse=True):
        up = torch.nn.functional.interpolate(masks[None].float(), size=size, mode="nearest")[0]  # (K, H, W)
        colours = PALETTE[torch.arange(masks.shape[0]) % len(PALETTE)]               # (K, 3)
        image = torch.einsum("khw,kc->hwc", up, colours).clamp(0, 1)
        images.append(image)
    return torch.stack(images)


class LagMaskPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerResLAGMaskPreview",
            display_name=PREVIEW_NAME,
            category="PerRes",
            description="After sampling, shows where each residual acted: one image per transformer resolution "
                        "(SD1.x at 512 px: 64, 32, 16, 8 latent px; SDXL at 1024 px: 64, 32; Anima and Krea 2: one, "
                        "their 2×2-patch grid), averaged over steps (and a DiT's blocks); concept 1 red, 2 blue, "
                        "3 green.",
            inputs=[
                io.Model.Input("model", tooltip="The model output of PerRes LAG Sampling."),
                io.Latent.Input("samples", tooltip="The sampler's output (so the preview runs after sampling)."),
            ],
            outputs=[io.Image.Output(display_name="masks", tooltip="The mask images (one per block resolution).")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, model, samples):
        return float("nan")  # the masks change with every sampling run

    @classmethod
    @guarded
    def execute(cls, model, samples) -> io.NodeOutput:
        patch = LagPatch.of(model)
        if patch is None:
            raise PerResError("the model does not come from PerRes LAG Sampling; connect that node's model output.")
        averages = patch.recorder.averages()
        if not averages:
            raise PerResError("no masks were recorded; connect this node after a sampler that used the LAG model.")
        latent = samples["samples"]
        images = preview_images(averages, (latent.shape[-2] * 8, latent.shape[-1] * 8))
        return io.NodeOutput(images, ui=ui.PreviewImage(images, cls=cls))
