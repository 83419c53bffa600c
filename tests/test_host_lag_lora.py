"""LAG for any SD1.x LoRA, in the real host: invariants against ComfyUI's own LoRA loader.

LoRA files in every format ComfyUI reads for SD1.x are built here (tests/lora_files.py) and loaded by
the stock LoraLoaderModelOnly and by PerRes LAG LoRA from the same models/loras folder.
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import pack, run_node
from host_helpers import encode, sample
from lora_files import FORMATS, alias, build_lora, write_lora

PROMPT = "a photo of ohwx woman and a zkz dog on a beach"
LAG_DEFAULTS = dict(prompt=PROMPT, concept_words="", strength=1.0, threshold="median", quantile=0.5,
                    start_percent=0.0, end_percent=1.0, outside_window="full residual")


@pytest.fixture(scope="module")
def loras_dir(workdir) -> str:
    return os.path.join(workdir, "models", "loras")


@pytest.fixture(scope="module")
def lora_file(sd15, loras_dir):
    """name of a LoRA file of each format, written once."""
    model = sd15[0]
    cache = {}

    def make(fmt: str, seed: int = 0, **kwargs) -> str:
        key = (fmt, seed, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = write_lora(loras_dir, f"lagtest_{fmt}_{seed}_{len(cache)}.safetensors",
                                    build_lora(model, fmt, seed=seed, **kwargs))
        return cache[key]
    return make


def lag_lora(sd15, chain: list[tuple[str, str, float]], constant=None, model=None, **settings):
    """(model, positive) of LAG with LoRA concepts, built by the nodes (chain: name, trigger words, strength)."""
    base, clip, _ = sd15
    concepts = None
    for name, words, strength in chain:
        concepts = run_node("PerResLAGLoRA", lora_name=name, trigger_words=words, strength=strength,
                            concepts=concepts)[0]
    if constant is None and not settings:
        return run_node("PerResLAGSampling", model=model or base, clip=clip, extra_concepts=concepts,
                        **LAG_DEFAULTS)
    lag_nodes = pack("nodes.lag_nodes")
    mask_settings = pack("perres_core.lag").MaskSettings(constant=constant, **settings)
    return lag_nodes.build_lag_model(model or base, clip, PROMPT, concepts, mask_settings)


def stock_lora(model, name: str, strength: float = 1.0):
    return run_node("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=strength)[0]


def assert_same_as(lag_result, reference, base, what: str):
    """Equal to the precision of a weight merge versus an activation delta: under 1 % of the LoRA's effect."""
    effect = (reference - base).abs().max()
    assert effect > 1e-2, f"{what}: the LoRA has no visible effect ({effect})"
    error = (lag_result - reference).abs().max()
    assert error < 0.01 * effect, f"{what}: differs from the stock loader by {error} (effect {effect})"


@pytest.fixture(scope="module")
def reference(sd15):
    """positive and negative conditioning, and the base model's sample."""
    model, clip, _ = sd15
    positive = encode(clip, PROMPT)
    negative = encode(clip, "")
    return positive, negative, sample(model, positive, negative, seed=3, steps=1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_masks_of_ones_are_the_stock_loader_and_masks_of_zeros_the_base_model(sd15, lora_file, reference, fmt):
    """M ≡ 1 gives LoraLoaderModelOnly's result at the same strength (weight merge vs activation delta);
    M ≡ 0 gives the base model bit for bit."""
    model = sd15[0]
    positive, negative, base = reference
    name = lora_file(fmt)
    ones, lag_positive = lag_lora(sd15, [(name, "ohwx, woman", 0.8)], constant=1.0)
    torch.testing.assert_close(lag_positive[0][0], positive[0][0])
    stock = sample(stock_lora(model, name, 0.8), positive, negative, seed=3, steps=1)
    assert_same_as(sample(ones, positive, negative, seed=3, steps=1), stock, base, fmt)
    zeros, _ = lag_lora(sd15, [(name, "ohwx, woman", 0.8)], constant=0.0)
    assert torch.equal(sample(zeros, positive, negative, seed=3, steps=1), base)


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
    model, clip, _ = sd15
    patched, positive = lag_lora(sd15, [(lora_file("kohya", 1), "ohwx, woman", 1.0),
                                        (lora_file("peft", 2), "zkz, dog", 1.0)])
    sample(patched, positive, encode(clip, ""), seed=9)
    patch = pack("nodes.host.lag_patch").LagPatch.of(patched)
    assert len(patch.bank.by_slot) == 16
    shares = torch.zeros(2)
    for slot, (first, second) in patch.bank.by_slot.items():
        assert (first * second).sum() == 0, f"block {slot}: the two LoRAs' masks overlap"
        shares += torch.stack([first.mean(), second.mean()]).cpu()
    # Where each concept wins is up to the random UNet's attention, but both must win some area: comparing
    # raw summed attention gave 'ohwx, woman' (more tokens) nothing in any block; relative maps give it ~2/3.
    assert shares.min() > 0.2 * shares.max(), shares.tolist()
    previews = run_node("PerResLAGMaskPreview", model=patched, samples={"samples": torch.zeros(1, 4, 8, 8)})[0]
    assert previews.shape[0] == 4 and previews.amax() > 0


def test_composes_with_a_stock_lora_applied_before(sd15, lora_file):
    model, clip, _ = sd15
    first, mine = lora_file("kohya", 5), lora_file("locon", 6)
    stocked = stock_lora(model, first, 1.0)
    negative = encode(clip, "")
    zeros, positive = lag_lora(sd15, [(mine, "ohwx", 1.0)], constant=0.0, model=stocked)
    assert torch.equal(sample(zeros, positive, negative, seed=10, steps=1), sample(stocked, positive, negative, seed=10, steps=1))
    ones, _ = lag_lora(sd15, [(mine, "ohwx", 1.0)], constant=1.0, model=stocked)
    both = stock_lora(stocked, mine, 1.0)
    assert_same_as(sample(ones, positive, negative, seed=10, steps=1), sample(both, positive, negative, seed=10, steps=1),
                   sample(stocked, positive, negative, seed=10, steps=1), "stock LoRA + LAG LoRA")


def test_composes_with_an_attn2_replace_patch(sd15, lora_file):
    """An IP-Adapter-style replace patch keeps running on every block and keeps its effect everywhere."""
    import comfy.ldm.modules.attention as attention

    model, clip, _ = sd15
    calls = []

    def replace(q, k, v, extra_options):
        calls.append(extra_options["block"])
        return attention.optimized_attention(q, k, v, extra_options["n_heads"]) + 0.05

    replaced = model.clone()
    for block, index in (("input", 1), ("middle", 0), ("output", 11)):
        replaced.set_model_attn2_replace(replace, block, index)
    name = lora_file("kohya")
    negative = encode(clip, "")
    zeros, positive = lag_lora(sd15, [(name, "ohwx", 1.0)], constant=0.0, model=replaced)
    assert torch.equal(sample(zeros, positive, negative, seed=11, steps=1), sample(replaced, positive, negative, seed=11, steps=1))
    calls.clear()
    ones, _ = lag_lora(sd15, [(name, "ohwx", 1.0)], constant=1.0, model=replaced)
    result = sample(ones, positive, negative, seed=11, steps=1)
    assert {tuple(b) for b in calls} == {("input", 1), ("middle", 0), ("output", 11)}
    assert_same_as(result, sample(stock_lora(replaced, name), positive, negative, seed=11, steps=1),
                   sample(replaced, positive, negative, seed=11, steps=1), "LoRA under an attn2 replace patch")


def test_median_masks_keep_the_lora_out_of_half_the_image(sd15, lora_file):
    """With real masks the result lies strictly between the base model and the LoRA everywhere."""
    model, clip, _ = sd15
    name = lora_file("locon")
    patched, positive = lag_lora(sd15, [(name, "ohwx, woman", 1.0)])
    negative = encode(clip, "")
    lag = sample(patched, positive, negative, seed=12)
    base = sample(model, positive, negative, seed=12)
    full = sample(stock_lora(model, name), positive, negative, seed=12)
    assert torch.isfinite(lag).all()
    assert 0.05 < (lag - base).abs().mean() / (full - base).abs().mean() < 0.95
    averages = pack("nodes.host.lag_patch").LagPatch.of(patched).recorder.averages()
    for (h, w), masks in averages.items():
        expected = 1.0 if h * w == 1 else 0.5   # a single location is kept
        assert masks.shape == (1, h, w) and abs(masks.mean().item() - expected) < 0.05


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
