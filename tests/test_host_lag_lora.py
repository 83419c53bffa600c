"""LAG for any SD1.x LoRA, in the real host (SDXL: tests/test_host_sdxl_lag.py): invariants against ComfyUI's own LoRA loader.

LoRA files in every format ComfyUI reads for SD1.x are built here (tests/lora_files.py) and loaded by
the stock LoraLoaderModelOnly and by PerRes LAG LoRA from the same models/loras folder.
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import pack, run_node
from host_helpers import encode, sample
from lag_lora_checks import (LAG_DEFAULTS, PROMPT, check_composes_with_a_stock_lora,
                             check_composes_with_an_attn2_replace_patch, check_disjoint_masks, check_lora_of_another_family_is_refused,
                             check_layers_before_the_map_follow_their_masks_from_the_first_call, check_median_masks,
                             check_ones_and_zeros)
from lora_files import FORMATS, alias, attention_layers, build_lora, write_lora

pytestmark = pytest.mark.every_host  # each host's LoRA key maps and weight adapters

FP32_MERGE_PRECISION = 0.01   # fp32 weights: a weight merge and an activation delta agree to rounding


@pytest.fixture(scope="module")
def loras_dir(workdir) -> str:
    return os.path.join(workdir, "models", "loras")


@pytest.fixture(scope="module")
def lora_file(sd15, loras_dir):
    """name of a LoRA file of each format, written once."""
    model = sd15[0]
    cache = {}

    def make(fmt: str, seed: int = 0, **kwargs) -> str:
        key = (fmt, seed, repr(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = write_lora(loras_dir, f"lagtest_{fmt}_{seed}_{len(cache)}.safetensors",
                                    build_lora(model, fmt, seed=seed, **kwargs))
        return cache[key]
    return make


@pytest.fixture(scope="module")
def reference(sd15):
    """positive and negative conditioning, and the base model's sample."""
    model, clip, _ = sd15
    positive = encode(clip, PROMPT)
    negative = encode(clip, "")
    return positive, negative, sample(model, positive, negative, seed=3, steps=1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_masks_of_ones_are_the_stock_loader_and_masks_of_zeros_the_base_model(sd15, lora_file, reference, fmt):
    check_ones_and_zeros(sd15, lora_file(fmt), reference, FP32_MERGE_PRECISION, fmt)


def test_layers_before_the_cross_attention_get_masks_of_the_same_call(sd15, lora_file):
    """A LoRA on proj_in, attn1 and attn2.to_q only: LAG with masks of ones from the attention (quantile 0) is the
    stock loader to 1e-3 of the LoRA's effect at 1 and 4 steps (fp32). Before issue 30 these layers ran as the base
    model in the first call: 8.5 % of the effect at 1 step, 7.7 % at 4."""
    before = [path for path in attention_layers() if path.endswith("proj_in") or ".attn1." in path
              or path.endswith("attn2.to_q")]
    check_layers_before_the_map_follow_their_masks_from_the_first_call(
        sd15, lora_file("kohya", seed=7, layers=before), 1e-3)


def test_lora_loaded_through_the_hosts_adapters(sd15, lora_file):
    """Plain factors stay factors; LoHa/LoKr/DoRA become one ΔW from the host's calculate_weight."""
    delta = pack("perres_core.layer_delta")
    model = sd15[0]
    kinds = {}
    for fmt in ("kohya", "locon", "loha", "dora"):
        spec = run_node("PerResLAGLoRA", lora_name=lora_file(fmt), trigger_words="ohwx", strength=1.0)[0][0]
        deltas, _ = pack("nodes.host.lag_concepts").lora_deltas(model, spec.lora, 1.0, spec.lora_name)
        kinds[fmt] = {type(d).__name__ for d in deltas.values()}
    assert kinds["kohya"] == kinds["locon"] == {"LowRankDelta"}
    assert kinds["loha"] == kinds["dora"] == {"DenseDelta"}
    conv = pack("nodes.host.lag_concepts").lora_deltas(model, run_node("PerResLAGLoRA", lora_name=lora_file("locon"),
                                                  trigger_words="ohwx", strength=1.0)[0][0].lora, 1.0, "x")[0]
    assert conv["input_blocks.3.0.op"].geometry == delta.ConvGeometry((2, 2), (1, 1), (1, 1), 1)


def test_perres_residual_file_through_lag_lora_equals_lag_sampling(sd15, loras_dir):
    """A PerRes residual is an ordinary LoRA file: used as a LAG LoRA it gives PerRes LAG Sampling's output."""
    from comfy_server import write_residual

    model, clip, _ = sd15
    name = "perres_as_lora.safetensors"
    write_residual(os.path.join(loras_dir, name), "ohwx", "woman")
    residuals = run_node("PerResLoadResiduals", residual_name=name)[0]
    prompt = "a photo of ohwx woman on a beach"
    settings = {**LAG_DEFAULTS, "prompt": prompt}
    perres, positive = run_node("PerResLAGSampling", model=model, clip=clip, residuals=residuals, **settings)
    concepts = run_node("PerResLAGLoRA", lora_name=name, trigger_words="ohwx, woman", strength=1.0)[0]
    as_lora, positive2 = run_node("PerResLAGSampling", model=model, clip=clip, extra_concepts=concepts, **settings)
    negative = encode(clip, "")
    a, b = sample(perres, positive, negative, seed=8, steps=1), sample(as_lora, positive2, negative, seed=8, steps=1)
    base = sample(model, positive, negative, seed=8, steps=1)
    assert (a - base).abs().max() > 1e-3
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_two_loras_get_disjoint_masks(sd15, lora_file):
    patched = check_disjoint_masks(sd15, lora_file("kohya", 1), lora_file("peft", 2), transformers=16)
    previews = run_node("PerResLAGMaskPreview", model=patched, samples={"samples": torch.zeros(1, 4, 8, 8)})[0]
    assert previews.shape[0] == 4 and previews.amax() > 0


def test_composes_with_a_stock_lora_applied_before(sd15, lora_file):
    check_composes_with_a_stock_lora(sd15, lora_file("kohya", 5), lora_file("locon", 6), FP32_MERGE_PRECISION)


def test_composes_with_an_attn2_replace_patch(sd15, lora_file):
    check_composes_with_an_attn2_replace_patch(sd15, lora_file("kohya"), (("input", 1), ("middle", 0), ("output", 11)),
                                               FP32_MERGE_PRECISION)


def test_median_masks_keep_the_lora_out_of_half_the_image(sd15, lora_file):
    assert len(check_median_masks(sd15, lora_file("locon"))) == 4


def test_text_encoder_only_lora_is_a_clear_error(sd15, loras_dir):
    model, clip, _ = sd15
    name = write_lora(loras_dir, "te_only.safetensors", {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768)})
    concepts = run_node("PerResLAGLoRA", lora_name=name, trigger_words="ohwx", strength=1.0)[0]
    with pytest.raises(Exception, match="changes no layer of this SD1.x UNet.*text-encoder only"):
        run_node("PerResLAGSampling", model=model, clip=clip, extra_concepts=concepts, **LAG_DEFAULTS)


def test_lora_for_another_model_is_a_clear_error(sd15, loras_dir):
    model, clip, _ = sd15
    name = write_lora(loras_dir, "sdxl_like.safetensors", {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight": torch.zeros(640, 4),
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight": torch.zeros(4, 640)})
    concepts = run_node("PerResLAGLoRA", lora_name=name, trigger_words="ohwx", strength=1.0)[0]
    with pytest.raises(Exception, match="changes no layer of this SD1.x UNet.*for another model"):
        run_node("PerResLAGSampling", model=model, clip=clip, extra_concepts=concepts, **LAG_DEFAULTS)


def test_an_sdxl_lora_is_a_clear_error_naming_both_families(sd15, loras_dir):
    """SDXL kohya files use LDM names, which SD1.x's key map also has (input_blocks.4.1 is a 640-channel
    transformer in both); the text width its cross-attention factors read (2048) tells them apart."""
    check_lora_of_another_family_is_refused(sd15, loras_dir, "sdxl_on_sd1.safetensors",
                                            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048,
                                            "is an SDXL LoRA .*2048.*but this model is SD1.x")


def test_bad_lag_lora_inputs_are_clear_errors(sd15, lora_file, loras_dir):
    model, clip, _ = sd15
    with pytest.raises(Exception, match="trigger_words is empty"):
        run_node("PerResLAGLoRA", lora_name=lora_file("kohya"), trigger_words=" , ", strength=1.0)
    with open(os.path.join(loras_dir, "pickled.pt"), "wb") as handle:
        handle.write(b"not read")
    with pytest.raises(Exception, match="not a .safetensors file"):
        run_node("PerResLAGLoRA", lora_name="pickled.pt", trigger_words="ohwx", strength=1.0)
    with pytest.raises(Exception, match="no concept is connected"):
        run_node("PerResLAGSampling", model=model, clip=clip, **LAG_DEFAULTS)


def test_kohya_names_are_the_diffusers_derived_ones(sd15):
    """The test files use the names real tools write, not only ComfyUI's own LDM aliases."""
    model = sd15[0]
    assert alias(model, "input_blocks.1.1.transformer_blocks.0.attn2.to_k", "kohya") == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert alias(model, "input_blocks.1.1.transformer_blocks.0.attn2.to_k", "peft") == \
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k"
