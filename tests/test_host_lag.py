"""LAG sampling in the real ComfyUI host: masks, composition, cond/uncond handling, long prompts."""
from __future__ import annotations

import logging

import pytest
import torch

from conftest import pack, run_node
from host_helpers import encode, sample, train

pytestmark = pytest.mark.every_host  # LAG's wrappers, hooks and token positions on each host's patcher and tokenizer

LONG_PREFIX = ", ".join(["a very detailed old oil painting of a quiet harbour town"] * 8)


@pytest.fixture(scope="module")
def residuals(sd15, concept_images):
    return train(sd15, concept_images, steps=1)[1]


@pytest.fixture(scope="module")
def second_residuals(residuals):
    """A second concept ('ktn cat') with its own random residual."""
    core = pack("perres_core.residual")
    with torch.inference_mode(False):
        other = core.ResidualSet.create(pack("perres_core.families").SD1.layer_shapes(),
                                        concept=core.ConceptInfo("ktn", "cat"))
        other.initialize("random", 99)
    for layer in other.layers.values():
        layer.requires_grad_(False)
    return other


def lag(model, clip, residuals, prompt, constant=None, extra=(), **settings):
    lag_nodes = pack("nodes.lag_nodes")
    mask_settings = pack("perres_core.lag").MaskSettings(constant=constant, **settings)
    specs = [spec(residuals, residuals.concept.concept_words())] + list(extra)
    return lag_nodes.build_lag_model(model, clip, prompt, specs, mask_settings)


def spec(residuals, words, strength=1.0):
    return pack("nodes.host.lag_concepts").ConceptSpec(words, strength, residuals=residuals)


def recorded(model):
    return pack("nodes.host.lag_patch").LagPatch.of(model).recorder.averages()


def test_lag_node_returns_patched_clone_and_leaves_input_untouched(sd15, residuals):
    model, clip, _ = sd15
    patched, positive = run_node("PerResLAGSampling", model=model, clip=clip, residuals=residuals,
                                 prompt="a photo of a sks dog on the beach", concept_words="", strength=1.0,
                                 threshold="median", quantile=0.5, start_percent=0.0, end_percent=1.0,
                                 outside_window="full residual")
    assert patched is not model and model.wrappers == {} and patched.wrappers
    assert positive[0][0].shape == (1, 77, 768)
    patch = pack("nodes.host.lag_patch").LagPatch.of(patched)
    assert patch.concepts[0].positions == [5, 6]  # <start> a photo of a [sks] [dog] ...


def test_all_ones_mask_matches_global_apply(sd15, residuals):
    """M ≡ 1 is Eq. 3's W' everywhere. The global Apply merges W + ΔW into the weight instead of adding
    ΔW·x; in fp32 the two differ only by rounding: after two CFG-5 steps through the random UNet, less
    than 1e-3 relative and under 1 % of the residual's own effect on the latents."""
    model, clip, _ = sd15
    prompt = "a photo of a sks dog on the beach"
    ones, positive = lag(model, clip, residuals, prompt, constant=1.0)
    applied = run_node("PerResApplyResiduals", model=model, residuals=residuals, strength=1.0)[0]
    negative = encode(clip, "")
    a = sample(ones, positive, negative, seed=5)
    b = sample(applied, positive, negative, seed=5)
    base = sample(model, positive, negative, seed=5)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    effect = (b - base).abs().max()
    assert effect > 1e-2 and (a - b).abs().max() < 0.01 * effect


def test_all_zeros_mask_is_exactly_the_base_model(sd15, residuals):
    model, clip, _ = sd15
    zeros, positive = lag(model, clip, residuals, "a photo of a sks dog", constant=0.0)
    negative = encode(clip, "")
    assert torch.equal(sample(zeros, positive, negative, seed=6), sample(model, positive, negative, seed=6))


def test_median_masks_cover_half_of_every_map(sd15, residuals):
    model, clip, _ = sd15
    patched, positive = lag(model, clip, residuals, "a photo of a sks dog in the snow")
    latents = sample(patched, positive, encode(clip, "blurry"), seed=7, batch=2, steps=2)
    assert torch.isfinite(latents).all()
    averages = recorded(patched)
    assert sorted(averages) == [(1, 1), (2, 2), (4, 4), (8, 8)]  # 64 px → latent 8×8 and below
    for (height, width), mask in averages.items():
        assert mask.shape == (1, height, width)
        expected = 1.0 if height * width == 1 else height * width / 2  # a single location is kept
        assert mask.sum().item() == pytest.approx(expected, abs=1e-4)


def test_multi_concept_masks_are_disjoint(sd15, residuals, second_residuals):
    model, clip, _ = sd15
    extra = [spec(second_residuals, ["ktn", "cat"])]
    patched, positive = lag(model, clip, residuals, "a sks dog and a ktn cat on a beach", extra=extra)
    sample(patched, positive, encode(clip, ""), seed=8, steps=1)
    by_slot = pack("nodes.host.lag_patch").LagPatch.of(patched).bank.by_slot
    assert len(by_slot) == 16
    shares = torch.zeros(2)
    for slot, masks in by_slot.items():  # each block's own masks (the preview averages blocks per resolution)
        assert len(masks) == 2
        assert torch.all(masks[0] * masks[1] == 0), f"concept masks overlap in block {slot}"
        shares += torch.stack([mask.float().mean() for mask in masks]).cpu()
    assert shares.min() > 0.2 * shares.max(), f"one concept got (almost) no area: {shares.tolist()}"


def test_mask_preview_node_draws_one_image_per_resolution(sd15, residuals):
    model, clip, _ = sd15
    patched, positive = lag(model, clip, residuals, "a photo of a sks dog")
    latent = {"samples": sample(patched, positive, encode(clip, ""), seed=9, steps=1)}
    images = run_node("PerResLAGMaskPreview", model=patched, samples=latent)[0]
    assert images.shape == (4, 64, 64, 3)
    assert 0.0 < images.mean() < 1.0


def test_stock_attn2_replace_patch_still_runs(sd15, residuals):
    from comfy.ldm.modules.attention import optimized_attention

    model, clip, _ = sd15
    patched, positive = lag(model, clip, residuals, "a photo of a sks dog")
    calls = []

    def replace(q, k, v, extra_options):
        calls.append(extra_options["block"])
        return optimized_attention(q, k, v, extra_options["n_heads"])

    patched.set_model_attn2_replace(replace, "input", 1)
    patched.set_model_attn2_replace(replace, "output", 11)
    latents = sample(patched, positive, encode(clip, ""), seed=10, steps=1)
    assert torch.isfinite(latents).all()
    assert ("input", 1) in calls and ("output", 11) in calls
    assert (8, 8) in recorded(patched)


def test_stacks_with_stock_lora_loader(sd15, residuals, second_residuals):
    model, clip, _ = sd15
    name = run_node("PerResSaveResiduals", residuals=second_residuals, filename_prefix="perres/stack")[0]
    with_lora = run_node("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=1.0)[0]
    stacked, positive = lag(with_lora, clip, residuals, "a photo of a sks dog")
    plain, _ = lag(model, clip, residuals, "a photo of a sks dog")
    negative = encode(clip, "")
    a, b = sample(stacked, positive, negative, seed=11, steps=1), sample(plain, positive, negative, seed=11, steps=1)
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-4
    assert len(with_lora.patches) == 16 and not model.patches


def test_154_token_prompt_finds_concept_in_second_chunk(sd15, residuals):
    model, clip, _ = sd15
    prompt = LONG_PREFIX + ", and a photo of a sks dog"
    patched, positive = lag(model, clip, residuals, prompt)
    assert positive[0][0].shape[1] == 154
    positions = pack("nodes.host.lag_patch").LagPatch.of(patched).concepts[0].positions
    assert positions and min(positions) > 77
    sample(patched, positive, encode(clip, "blurry"), seed=12, steps=1, batch=2)  # 77 vs 154 → LCM batching
    assert (8, 8) in recorded(patched)


def test_weight_syntax_gives_the_same_token_positions(sd15, residuals):
    model, clip, _ = sd15
    plain, _ = lag(model, clip, residuals, "a photo of a sks dog on the beach")
    weighted, _ = lag(model, clip, residuals, "a photo of a (sks dog:1.2) on the beach")
    get = pack("nodes.host.lag_patch").LagPatch.of
    assert get(plain).concepts[0].positions == get(weighted).concepts[0].positions == [5, 6]


def test_multi_token_word_positions(sd15, residuals):
    model, clip, _ = sd15
    patched, _ = lag(model, clip, residuals, "a photo of a sks dog", extra=[spec(residuals, ["photorealistic"])])
    # not in the prompt → warned and applied everywhere; a word split into several BPE tokens is found whole
    patched2, _ = lag(model, clip, residuals, "photorealistic sks dog", extra=[spec(residuals, ["photorealistic"])])
    word_ids = pack("nodes.host.text_tokens").word_token_ids(clip, "photorealistic")
    assert len(word_ids) > 1
    assert pack("nodes.host.lag_patch").LagPatch.of(patched2).concepts[1].positions == list(range(1, 1 + len(word_ids)))


def test_missing_concept_words_warn_and_fall_back_to_global(sd15, residuals, caplog):
    model, clip, _ = sd15
    with caplog.at_level(logging.WARNING, logger="perres"):
        patched, positive = lag(model, clip, residuals, "a mountain lake at dawn")
    assert "not in the prompt" in caplog.text and "everywhere" in caplog.text
    sample(patched, positive, encode(clip, ""), seed=13, steps=1)
    for mask in recorded(patched).values():
        assert torch.all(mask == 1.0)


def test_uncond_rows_use_their_positive_partners_mask_also_when_split(sd15, residuals):
    """A negative chunk batched with the positive one, and a negative chunk run alone after it, get the
    same residual mask, so splitting the CFG batch (low memory) does not change the result."""
    import comfy.model_management

    model, clip, _ = sd15
    patched, positive = lag(model, clip, residuals, "a photo of a sks dog")
    patch = pack("nodes.host.lag_patch").LagPatch.of(patched)
    unet = patched.model.diffusion_model
    cond = positive[0][0]
    uncond = encode(clip, "")[0][0]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])

    class Executor:
        class_obj = unet

        def __call__(self, *args, **kwargs):
            return unet._forward(*args, **kwargs)

    def call(rows_x, context, chunks):
        options = {"cond_or_uncond": chunks, "sigmas": torch.tensor([1.0])}
        return patch.diffusion_model(Executor(), rows_x, t.repeat(rows_x.shape[0]), context, None, None, options)

    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patched], force_full_load=True)
        joint = call(torch.cat([x, x]), torch.cat([uncond, cond]), [1, 0])
        call(x, cond, [0])
        alone = call(x, uncond, [1])
    torch.testing.assert_close(alone, joint[:1], rtol=1e-5, atol=1e-5)
