"""Subject masks in the real ComfyUI host (random SD1.5 checkpoint, 64 px): alpha → masks output, the
masked ε-loss of PerRes Train Residuals, and its errors."""
from __future__ import annotations

import logging
import os

import pytest
import torch
from PIL import Image

from conftest import pack, run_node
from host_helpers import encode, held_out_loss, layers_equal, train, untrained_residuals

TRAIN = "PerRes Train Residuals"


@pytest.fixture(scope="module")
def square_masks(concept_images) -> torch.Tensor:
    """1 on the bright square of the `concept_images` fixture (its subject), 0 on the random background."""
    masks = torch.zeros(concept_images.shape[:3])
    masks[:, 16:48, 16:48] = 1.0
    return masks


def perres_error():
    return pack("perres_core.errors").PerResError


# ------------------------------------------------------------------------------------------------
# PerRes Load Concept Images: alpha → masks
# ------------------------------------------------------------------------------------------------
def test_alpha_of_rgba_files_reaches_the_masks_output(workdir):
    folder = os.path.join(workdir, "input", "perres_mask_tests")
    os.makedirs(folder, exist_ok=True)
    alpha = torch.zeros(64, 64)
    alpha[8:40, 20:60] = 1.0
    alpha[40:50, 20:60] = 0.5
    rgba = torch.cat([torch.full((64, 64, 3), 0.2), alpha[..., None]], dim=-1)
    Image.fromarray((rgba * 255).round().byte().numpy(), "RGBA").save(os.path.join(folder, "a_cutout.png"))
    gray_alpha = torch.stack([torch.full((64, 64), 0.2), alpha.flip(1)], dim=-1)
    Image.fromarray((gray_alpha * 255).round().byte().numpy(), "LA").save(os.path.join(folder, "b_gray.png"))
    Image.new("RGB", (96, 64), (10, 200, 30)).save(os.path.join(folder, "c_photo.jpg"))

    (images,), (masks,) = run_node("PerResLoadConceptImages", folder="perres_mask_tests", resolution=64)
    assert masks.shape == (3, 64, 64) and masks.dtype == torch.float32
    quantised = (alpha * 255).round() / 255  # what an 8-bit PNG stores
    torch.testing.assert_close(masks[0], quantised, atol=1e-6, rtol=0)
    torch.testing.assert_close(masks[1], quantised.flip(1), atol=1e-6, rtol=0)
    assert torch.equal(masks[2], torch.ones(64, 64)), "an image without alpha is all subject"
    # the colours are still composited over white where the cut-out is transparent
    torch.testing.assert_close(images[0, 0, 0], torch.ones(3), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# PerRes Train Residuals: the weighted loss
# ------------------------------------------------------------------------------------------------
def test_zero_weight_locations_contribute_no_residual_gradient(sd15, concept_images, square_masks):
    """Through the real UNet with the residual hooks: changing the target ε only where the weight is 0 leaves
    the residual's gradient bit for bit unchanged; changing it inside the mask does not."""
    training, hooks, host = pack("perres_core.training"), pack("nodes.host.residual_hooks"), pack("nodes.host.training")
    model, clip, vae = sd15
    residuals = untrained_residuals(0)
    with torch.inference_mode():
        latents = model.model.process_latent_in(vae.encode(concept_images)).clone()
        context = encode(clip, "a photo of a sks dog")[0][0].clone().expand(4, -1, -1)
    weights = training.loss_weights(square_masks, (8, 8), 0.0)
    background = (weights == 0).float()
    assert 0 < background.mean() < 1
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.tensor([100, 300, 500, 700])
    x_t = training.noisy_latents(latents, noise, t, pack("nodes.host.model").diffusion_schedule(model))
    unet = model.model.diffusion_model

    def residual_gradient(target: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode(False), torch.enable_grad(), host.frozen_for_backward(unet), \
                hooks.residual_hooks(unet, residuals.layers):
            params = list(residuals.parameters())
            for param in params:
                param.requires_grad_(True)
                param.grad = None
            prediction = unet(x_t, t.float(), context=context)
            training.prediction_loss(prediction.float(), target, weights).backward()
            return [param.grad.clone() for param in params]

    reference = residual_gradient(noise)
    assert any(g.abs().sum() > 0 for g in reference)
    outside = residual_gradient(noise + 3.0 * background)
    assert all(torch.equal(a, b) for a, b in zip(reference, outside)), "the background changed the gradient"
    inside = residual_gradient(noise + 3.0 * (1 - background))
    assert not all(torch.equal(a, b) for a, b in zip(reference, inside))


def test_loss_inside_the_mask_falls_over_training(sd15, concept_images, square_masks):
    model, clip, vae = sd15
    steps, seed, lr = 8, 4, 3e-3
    trained = train(sd15, concept_images, steps=steps, seed=seed, learning_rate=lr, batch_size=4,
                    masks=square_masks, background_weight=0.0)[1]
    weights = pack("perres_core.training").loss_weights(square_masks, (8, 8), 0.0)
    before = held_out_loss(model, clip, vae, concept_images, untrained_residuals(seed), weights=weights)
    after = held_out_loss(model, clip, vae, concept_images, trained, weights=weights)
    assert after < before * 0.995, f"masked held-out ε-loss did not drop: {before:.5f} → {after:.5f}"
    unmasked = train(sd15, concept_images, steps=steps, seed=seed, learning_rate=lr, batch_size=4)[1]
    assert not layers_equal(trained, unmasked), "the masks changed nothing"
    assert trained.training["background_weight"] == 0.0


def test_masks_of_all_ones_are_bit_identical_to_no_masks(sd15, concept_images, square_masks):
    plain = train(sd15, concept_images, steps=2, seed=6)[1]
    ones = train(sd15, concept_images, steps=2, seed=6, masks=torch.ones(4, 64, 64), background_weight=0.0)[1]
    assert layers_equal(plain, ones)
    weight_one = train(sd15, concept_images, steps=2, seed=6, masks=square_masks, background_weight=1.0)[1]
    assert layers_equal(plain, weight_one)
    assert "background_weight" not in plain.training


def test_each_step_weights_its_images_with_their_own_masks(sd15, concept_images, monkeypatch):
    """The per-step batch takes the masks of the same images as the latents: each image's mask differs, and
    the weights the loss receives must be those of the drawn images (recognised by their clean latents)."""
    training = pack("perres_core.training")
    masks = torch.zeros(4, 64, 64)
    for i in range(4):
        masks[i, :, 16 * i:16 * (i + 1)] = 1.0  # image i: one vertical band of its own
    seen = []
    real_loss, real_noisy = training.prediction_loss, training.noisy_latents

    def noisy(x0, noise, t, alphas):
        seen.append({"x0": x0.clone()})
        return real_noisy(x0, noise, t, alphas)

    def loss(prediction, noise, weights=None):
        seen[-1]["weights"] = weights.clone()
        return real_loss(prediction, noise, weights)

    monkeypatch.setattr(training, "noisy_latents", noisy)
    monkeypatch.setattr(training, "prediction_loss", loss)
    model, _, vae = sd15
    train(sd15, concept_images, steps=3, batch_size=2, seed=2, masks=masks, background_weight=0.0)
    with torch.inference_mode():
        latents = model.model.process_latent_in(vae.encode(concept_images)).float()
    expected = training.loss_weights(masks, (8, 8), 0.0)
    assert len(seen) == 3
    for step in seen:
        for x0, weights in zip(step["x0"], step["weights"]):
            image = min(range(4), key=lambda i: (latents[i] - x0).abs().max().item())
            assert torch.equal(weights, expected[image])


def test_one_mask_for_all_images_is_used_for_each_and_warned_about(sd15, concept_images, square_masks, caplog):
    with caplog.at_level(logging.WARNING, logger="perres"):
        single = train(sd15, concept_images, steps=1, seed=6, masks=square_masks[:1], background_weight=0.0)[1]
    assert any("one mask for 4 images" in r.getMessage() for r in caplog.records)
    batch = train(sd15, concept_images, steps=1, seed=6, masks=square_masks, background_weight=0.0)[1]
    assert layers_equal(single, batch)


@pytest.mark.parametrize("masks, overrides, fragments", [
    (torch.ones(3, 64, 64), {}, ("3 masks for 4 images", "one mask per image")),
    (torch.ones(4, 64, 96), {}, ("mask 1 is 96×64 px but its image 64×64", "same picture")),
    (torch.zeros(4, 64, 64), {}, ("mask 1 marks (almost) no pixel", "invert_masks")),
    (torch.ones(4, 64, 64), {"invert_masks": True}, ("mask 1 marks (almost) no pixel",)),
    (torch.full((4, 64, 64), 255.0), {}, ("between 0 and 1", "not an image")),
    (torch.ones(4, 64, 64), {"background_weight": 2.0}, ("background_weight must be between 0 and 1",)),
], ids=["count", "aspect", "empty", "inverted_to_empty", "range", "background_weight"])
def test_bad_masks_give_clear_errors(sd15, concept_images, masks, overrides, fragments):
    with pytest.raises(perres_error()) as info:
        train(sd15, concept_images, steps=1, masks=masks, **overrides)
    message = str(info.value)
    assert message.startswith(TRAIN + ": "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
