"""LAG on SDXL in the real host: concept positions in SDXL prompts, PerRes SDXL residuals and SDXL LoRAs of
every format the host's LoRA loader reads, against the stock loaders, on the random SDXL checkpoint.

SDXL's transformers hold 2 or 10 BasicTransformerBlocks, each with its own cross-attention; each makes a
mask for the layers after it, and proj_out (the PerRes residual) uses the transformer's mask from all of
them (nodes/host/lag_patch.py).

Precision. The `sdxl` fixture computes in bf16; there, rounding alone moves a one-step sample about as much
as a LoRA does (max 22 against 25 for a LoRA merged at strength 1e-3 vs 0.8), so these tests compute in
fp32 from the same bf16 weights (ComfyUI's own CPU default for bf16 weights, manual cast). What remains
is the stock loader's rounding of W + ΔW to bf16, a fixed amount (max about 1.5-2 in these samples)
whatever the LoRA's size; the test LoRAs are made large enough (scale 3) that it stays under 2 % of their
effect (measured 0.8-1.7 % over the six formats).
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

from conftest import pack, run_node
from host_helpers import encode, sample
from lag_lora_checks import (LAG_DEFAULTS, PROMPT, assert_same_as, check_composes_with_a_stock_lora,
                             check_composes_with_an_attn2_replace_patch, check_disjoint_masks, check_lora_of_another_family_is_refused,
                             check_median_masks, check_ones_and_zeros, lag_lora)
from lora_files import FORMATS, build_lora, write_lora

pytestmark = [pytest.mark.sdxl, pytest.mark.slow]

# the stock loader's W + ΔW rounded to bf16 against W·x + ΔW·x (see the module docstring)
BF16_MERGE_PRECISION = 0.03
LORA_SCALE = 3.0
RESIDUAL_SCALE = 8.0   # the residual stand-in's factors: random init times this, for the same reason
# at 64 px SDXL's inner transformers see 2×2 locations; mask tests sample at 128 px (8×8 and 4×4)
MASK_TEST_SIZE = 128


@pytest.fixture(scope="module", autouse=True)
def fp32_compute(sdxl):
    """The SDXL model computes in fp32 from its bf16 weights while these tests run."""
    base = sdxl[0].model
    before = base.manual_cast_dtype
    base.manual_cast_dtype = torch.float32
    yield
    base.manual_cast_dtype = before


@pytest.fixture(scope="module")
def loras_dir(workdir) -> str:
    return os.path.join(workdir, "models", "loras")


@pytest.fixture(scope="module")
def sdxl_lora(sdxl, loras_dir):
    """name of an SDXL LoRA file of each format, written once."""
    cache = {}

    def make(fmt: str, seed: int = 0, **kwargs) -> str:
        key = (fmt, seed, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = write_lora(loras_dir, f"sdxl_lagtest_{fmt}_{seed}_{len(cache)}.safetensors",
                                    build_lora(sdxl[0], fmt, seed=seed, **{"scale": LORA_SCALE, **kwargs}))
        return cache[key]
    return make


@pytest.fixture(scope="module")
def reference(sdxl):
    """positive and negative conditioning, and the base model's one-step sample."""
    model, clip, _ = sdxl
    positive, negative = encode(clip, PROMPT), encode(clip, "")
    return positive, negative, sample(model, positive, negative, seed=3, steps=1)


def test_concept_positions_are_the_same_for_both_sdxl_tokenizers_in_long_weighted_prompts(sdxl):
    """CLIP-L and CLIP-G columns sit side by side in SDXL's context: a word's token positions must be the same
    in both tokenizations, also past the first 77-token chunk and inside (word:1.2) weights."""
    clip = sdxl[1]
    text_tokens, tokens = pack("nodes.host.text_tokens"), pack("perres_core.tokens")
    filler = ", ".join(["a very detailed painting of a quiet harbour at dawn"] * 8)
    prompt = f"{filler}, (ohwx woman:1.2) next to a [zkz] dog"
    chunks = text_tokens.prompt_token_chunks(clip, prompt)
    assert len(chunks) >= 2, "the prompt must be longer than one 77-token chunk"
    by_key = {key: [[int(t[0]) for t in chunk] for chunk in value] for key, value in clip.tokenize(prompt).items()}
    assert set(by_key) == {"g", "l"}
    words = {w: text_tokens.word_token_ids(clip, w) for w in ("ohwx", "woman", "zkz")}
    positions = {key: tokens.concept_positions(value, words) for key, value in by_key.items()}
    assert positions["g"] == positions["l"]
    found, missing = positions["l"]
    assert not missing and min(found) >= 77, found
    assert tokens.concept_positions(chunks, words) == positions["l"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_masks_of_ones_are_the_stock_loader_and_masks_of_zeros_the_base_model(sdxl, sdxl_lora, reference, fmt):
    check_ones_and_zeros(sdxl, sdxl_lora(fmt), reference, BF16_MERGE_PRECISION, fmt)


def test_every_block_of_a_deep_transformer_gets_its_own_mask_and_label_emb_stays_global(sdxl, sdxl_lora, caplog):
    model, clip, _ = sdxl
    with caplog.at_level(logging.WARNING, logger="perres"):
        patched, positive = lag_lora(sdxl, [(sdxl_lora("locon"), "ohwx, woman", 1.0)])
    warnings = [record.getMessage() for record in caplog.records]
    sample(patched, positive, encode(clip, ""), seed=4, steps=2, size=MASK_TEST_SIZE)
    patch = pack("nodes.host.lag_patch").LagPatch.of(patched)
    family = pack("perres_core.families").SDXL
    sites = {(slot.index, j) for slot in family.slots for j in range(slot.depth)}
    assert sites <= set(patch.bank.by_site), "a block without a mask"
    assert set(patch.bank.by_slot) == {slot.index for slot in family.slots}
    middle = next(slot for slot in family.slots if slot.path == "middle_block.1")
    blocks = [patch.bank.by_site[(middle.index, j)][0] for j in range(10)]
    for mask in blocks + [patch.bank.by_slot[middle.index][0]]:
        assert abs(mask.float().mean().item() - 0.5) < 0.05
    assert any(not torch.equal(blocks[0], mask) for mask in blocks[1:]), \
        "the blocks' masks should come from their own attention"
    layers = pack("perres_core.lag_layers")
    assert layers.placement("label_emb.0.0", family).role is layers.Role.GLOBAL
    assert any("label_emb.0.0" in text and "base model" in text for text in warnings), warnings


def test_two_sdxl_loras_get_disjoint_masks_in_every_transformer(sdxl, sdxl_lora):
    patched = check_disjoint_masks(sdxl, sdxl_lora("kohya", 1), sdxl_lora("peft", 2), transformers=11,
                                   size=MASK_TEST_SIZE)
    previews = run_node("PerResLAGMaskPreview", model=patched, samples={"samples": torch.zeros(1, 4, 8, 8)})[0]
    assert previews.shape[0] == 2 and previews.amax() > 0   # SDXL's transformers sit at two resolutions


def test_composes_with_a_stock_lora_applied_before(sdxl, sdxl_lora):
    check_composes_with_a_stock_lora(sdxl, sdxl_lora("kohya", 5), sdxl_lora("locon", 6), BF16_MERGE_PRECISION)


def test_composes_with_an_attn2_replace_patch(sdxl, sdxl_lora):
    check_composes_with_an_attn2_replace_patch(sdxl, sdxl_lora("kohya"), (("input", 4), ("middle", 0), ("output", 5)),
                                               BF16_MERGE_PRECISION)


def test_median_masks_keep_the_lora_out_of_half_the_image(sdxl, sdxl_lora):
    assert sorted(check_median_masks(sdxl, sdxl_lora("locon"))) == [(2, 2), (4, 4)]


def sdxl_residual_file(loras_dir: str) -> str:
    """A PerRes SDXL residual (random init, not trained) written by the pack's own writer; its name."""
    residual = pack("perres_core.residual")
    residuals = residual.ResidualSet.for_family(pack("perres_core.families").SDXL,
                                                concept=residual.ConceptInfo("ohwx", "woman"))
    with torch.inference_mode(False):
        residuals.initialize("random", 0)
        for layer in residuals.layers.values():
            layer.up.data.mul_(RESIDUAL_SCALE)
    name = "sdxl_perres_residual.safetensors"
    pack("perres_core.residual_file").save_residual_file(residuals, os.path.join(loras_dir, name), "test")
    return name


def test_lag_sampling_with_a_perres_sdxl_residual(sdxl, loras_dir, reference):
    """Masks of ones are PerRes Apply, masks of zeros the base model; median, quantile and soft masks, the
    schedule window and the residual used as a LAG LoRA all run on SDXL."""
    model, clip, _ = sdxl
    positive, negative, base = reference
    name = sdxl_residual_file(loras_dir)
    residuals = run_node("PerResLoadResiduals", residual_name=name)[0]
    lag_nodes, lag = pack("nodes.lag_nodes"), pack("perres_core.lag")
    spec = pack("nodes.host.lag_concepts").ConceptSpec(["ohwx", "woman"], 1.0, residuals=residuals)

    def with_masks(**settings):
        patched, _ = lag_nodes.build_lag_model(model, clip, PROMPT, [spec], lag.MaskSettings(**settings))
        return sample(patched, positive, negative, seed=3, steps=1)

    applied = run_node("PerResApplyResiduals", model=model, residuals=residuals, strength=1.0)[0]
    assert_same_as(with_masks(constant=1.0), sample(applied, positive, negative, seed=3, steps=1), base, "residual",
                   BF16_MERGE_PRECISION)
    assert torch.equal(with_masks(constant=0.0), base)
    for threshold, expected in (("median", 0.5), ("quantile", 0.25), ("soft", None)):
        patched, lag_positive = run_node("PerResLAGSampling", model=model, clip=clip, residuals=residuals,
                                         **{**LAG_DEFAULTS, "threshold": threshold, "quantile": 0.75})
        result = sample(patched, lag_positive, negative, seed=3, steps=2)
        assert torch.isfinite(result).all()
        averages = pack("nodes.host.lag_patch").LagPatch.of(patched).recorder.averages()
        if expected is not None:
            assert all(abs(m.mean().item() - expected) < 0.05 for m in averages.values()), (threshold, averages)
    windowed, lag_positive = run_node("PerResLAGSampling", model=model, clip=clip, residuals=residuals,
                                      **{**LAG_DEFAULTS, "start_percent": 0.5, "outside_window": "base model"})
    first_step = sample(windowed, lag_positive, negative, seed=3, steps=1)
    assert torch.equal(first_step, base), "outside the window the base model samples"
    as_lora, lora_positive = lag_lora(sdxl, [(name, "ohwx, woman", 1.0)])
    perres, perres_positive = run_node("PerResLAGSampling", model=model, clip=clip, residuals=residuals,
                                       **LAG_DEFAULTS)
    torch.testing.assert_close(sample(as_lora, lora_positive, negative, seed=8, steps=1),
                               sample(perres, perres_positive, negative, seed=8, steps=1), rtol=1e-5, atol=1e-5)


def test_a_lora_of_the_other_family_is_a_clear_error_naming_both(sdxl, loras_dir):
    """SD1.x kohya names for down_blocks 1-2 and the up blocks also exist in SDXL's key map, so the file's
    text width (768 against SDXL's 2048) is what tells them apart."""
    check_lora_of_another_family_is_refused(sdxl, loras_dir, "sd1_on_sdxl.safetensors",
                                            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 640,
                                            768, "is an SD1.x LoRA .*768.*but this model is SDXL")
