"""The invariants of LAG for any LoRA, written once for every model family (tests/test_host_lag_lora.py on
SD1.x, tests/test_host_sdxl_lag.py on SDXL): masks of ones are the stock LoraLoaderModelOnly, masks of zeros
the base model, it composes with a stock LoRA and with an attn2 replace patch, median masks keep the LoRA
out of half the image, and two LoRAs get disjoint masks.

`models` is the (model, clip, vae) of a family's fixture; `precision` how far, as a share of the LoRA's
effect, LAG's W·x + ΔW·x may be from the stock loader's merged W + ΔW.
"""
from __future__ import annotations

import pytest
import torch

from conftest import pack, run_node
from host_helpers import encode, sample

PROMPT = "a photo of ohwx woman and a zkz dog on a beach"
LAG_DEFAULTS = dict(prompt=PROMPT, concept_words="", strength=1.0, threshold="median", quantile=0.5,
                    start_percent=0.0, end_percent=1.0, outside_window="full residual")


def lag_lora(models, chain: list[tuple[str, str, float]], constant=None, model=None, prompt: str = PROMPT,
             **settings):
    """(model, positive) of LAG with LoRA concepts, built by the nodes (chain: name, trigger words, strength)."""
    base, clip, _ = models
    concepts = None
    for name, words, strength in chain:
        concepts = run_node("PerResLAGLoRA", lora_name=name, trigger_words=words, strength=strength,
                            concepts=concepts)[0]
    if constant is None and not settings:
        return run_node("PerResLAGSampling", model=model or base, clip=clip, extra_concepts=concepts,
                        **{**LAG_DEFAULTS, "prompt": prompt})
    mask_settings = pack("perres_core.lag").MaskSettings(constant=constant, **settings)
    return pack("nodes.lag_nodes").build_lag_model(model or base, clip, prompt, concepts, mask_settings)


def stock_lora(model, name: str, strength: float = 1.0):
    return run_node("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=strength)[0]


def assert_same_as(lag_result, reference, base, what: str, precision: float):
    """Equal to the precision of a weight merge versus an activation delta: under `precision` of the effect."""
    effect = (reference - base).abs().max()
    assert effect > 1e-2, f"{what}: the LoRA has no visible effect ({effect})"
    error = (lag_result - reference).abs().max()
    assert error < precision * effect, f"{what}: differs from the stock loader by {error} (effect {effect})"


def check_ones_and_zeros(models, name: str, reference, precision: float, what: str) -> None:
    """M ≡ 1 gives LoraLoaderModelOnly's result at the same strength; M ≡ 0 the base model bit for bit."""
    positive, negative, base = reference
    ones, lag_positive = lag_lora(models, [(name, "ohwx, woman", 0.8)], constant=1.0)
    torch.testing.assert_close(lag_positive[0][0], positive[0][0])
    stock = sample(stock_lora(models[0], name, 0.8), positive, negative, seed=3, steps=1)
    assert_same_as(sample(ones, positive, negative, seed=3, steps=1), stock, base, what, precision)
    zeros, _ = lag_lora(models, [(name, "ohwx, woman", 0.8)], constant=0.0)
    assert torch.equal(sample(zeros, positive, negative, seed=3, steps=1), base)


def check_layers_before_the_map_follow_their_masks_from_the_first_call(models, name: str, precision: float,
                                                                      steps=(1, 4)) -> None:
    """Masks that are all ones because the attention says so (quantile 0, not a constant) give the stock loader's
    result at 1 and at 4 steps for a LoRA on layers that run before their block's map (issue 30): in the first call
    no layer falls back to the base model for want of a mask."""
    model, clip, _ = models
    negative = encode(clip, "")
    for count in steps:
        ones, positive = lag_lora(models, [(name, "ohwx, woman", 1.0)], mode="quantile", quantile=0.0)
        base = sample(model, positive, negative, seed=4, steps=count)
        assert_same_as(sample(ones, positive, negative, seed=4, steps=count),
                       sample(stock_lora(model, name), positive, negative, seed=4, steps=count), base,
                       f"layers before the map, {count} step(s)", precision)


def check_composes_with_a_stock_lora(models, first: str, mine: str, precision: float) -> None:
    """LAG on a model that a stock loader already changed: zeros are that model, ones both LoRAs merged."""
    model, clip, _ = models
    stocked = stock_lora(model, first, 1.0)
    negative = encode(clip, "")
    zeros, positive = lag_lora(models, [(mine, "ohwx", 1.0)], constant=0.0, model=stocked)
    stocked_sample = sample(stocked, positive, negative, seed=10, steps=1)
    assert torch.equal(sample(zeros, positive, negative, seed=10, steps=1), stocked_sample)
    ones, _ = lag_lora(models, [(mine, "ohwx", 1.0)], constant=1.0, model=stocked)
    assert_same_as(sample(ones, positive, negative, seed=10, steps=1),
                   sample(stock_lora(stocked, mine, 1.0), positive, negative, seed=10, steps=1),
                   stocked_sample, "stock LoRA + LAG LoRA", precision)


def check_composes_with_an_attn2_replace_patch(models, name: str, blocks: tuple, precision: float) -> None:
    """An IP-Adapter-style replace patch on `blocks` ((kind, index), ...) keeps running and keeps its effect."""
    import comfy.ldm.modules.attention as attention

    model, clip, _ = models
    calls = []

    def replace(q, k, v, extra_options):
        calls.append(extra_options["block"])
        return attention.optimized_attention(q, k, v, extra_options["n_heads"]) + 0.05

    replaced = model.clone()
    for block, index in blocks:
        replaced.set_model_attn2_replace(replace, block, index)
    negative = encode(clip, "")
    zeros, positive = lag_lora(models, [(name, "ohwx", 1.0)], constant=0.0, model=replaced)
    replaced_sample = sample(replaced, positive, negative, seed=11, steps=1)
    assert torch.equal(sample(zeros, positive, negative, seed=11, steps=1), replaced_sample)
    calls.clear()
    ones, _ = lag_lora(models, [(name, "ohwx", 1.0)], constant=1.0, model=replaced)
    result = sample(ones, positive, negative, seed=11, steps=1)
    assert {tuple(b) for b in calls} == set(blocks)
    assert_same_as(result, sample(stock_lora(replaced, name), positive, negative, seed=11, steps=1),
                   replaced_sample, "LoRA under an attn2 replace patch", precision)


def check_median_masks(models, name: str) -> dict:
    """With real masks the result lies strictly between the base model and the LoRA everywhere, and every
    resolution's mask covers half the image (a single location is kept). Returns the preview's averages."""
    model, clip, _ = models
    patched, positive = lag_lora(models, [(name, "ohwx, woman", 1.0)])
    negative = encode(clip, "")
    lag = sample(patched, positive, negative, seed=12)
    base = sample(model, positive, negative, seed=12)
    full = sample(stock_lora(model, name), positive, negative, seed=12)
    assert torch.isfinite(lag).all()
    assert 0.05 < (lag - base).abs().mean() / (full - base).abs().mean() < 0.95
    averages = pack("nodes.host.lag_patch").LagPatch.of(patched).recorder.averages()
    for (h, w), masks in averages.items():
        expected = 1.0 if h * w == 1 else 0.5
        assert masks.shape == (1, h, w) and abs(masks.mean().item() - expected) < 0.05
    return averages


def check_disjoint_masks(models, first: str, second: str, transformers: int, size: int = 64):
    """Two LoRAs' masks never overlap, at every mask site, and both win some area; returns the patch."""
    _, clip, _ = models
    patched, positive = lag_lora(models, [(first, "ohwx, woman", 1.0), (second, "zkz, dog", 1.0)])
    sample(patched, positive, encode(clip, ""), seed=9, size=size)
    patch = pack("nodes.host.lag_patch").LagPatch.of(patched)
    assert len(patch.bank.by_slot) == transformers
    shares = torch.zeros(2)
    for site, (one, other) in patch.bank.by_site.items():
        assert (one * other).sum() == 0, f"site {site}: the two LoRAs' masks overlap"
        shares += torch.stack([one.mean(), other.mean()]).cpu()
    # Where each concept wins is up to the random UNet's attention, but both must win some area: comparing
    # raw summed attention gave 'ohwx, woman' (more tokens) nothing in any block; relative maps give it ~2/3.
    assert shares.min() > 0.2 * shares.max(), shares.tolist()
    return patched


def check_lora_of_another_family_is_refused(models, loras_dir: str, file_name: str, key: str, channels: int,
                                            text_width: int, message: str) -> None:
    """A kohya file with one attn2.to_k factor pair for `text_width`-wide text: PerRes LAG Sampling refuses it
    with an error matching `message` (the layer names alone would partly match the other family's)."""
    from lora_files import write_lora

    model, clip, _ = models
    name = write_lora(loras_dir, file_name, {
        f"{key}.lora_up.weight": torch.zeros(channels, 4), f"{key}.lora_down.weight": torch.zeros(4, text_width),
        f"{key}.alpha": torch.tensor(4.0)})
    concepts = run_node("PerResLAGLoRA", lora_name=name, trigger_words="ohwx", strength=1.0)[0]
    with pytest.raises(Exception, match=message):
        run_node("PerResLAGSampling", model=model, clip=clip, extra_concepts=concepts, **LAG_DEFAULTS)
