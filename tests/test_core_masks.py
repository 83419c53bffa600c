"""Subject masks, weighted loss and continuing a run, on small tensors (no host needed)."""
from __future__ import annotations

import pytest
import torch

from perres_core.errors import PerResError
from perres_core.buckets import bucket_images
from perres_core.images import alpha_mask, matched_masks, prepare_batch
from perres_core.residual import ResidualSet, check_continuable, steps_trained
from perres_core.families import SD1
from perres_core.training import LatentBucket, TrainSettings, prediction_loss, loss_weights, train_residuals


def trained_masks(masks: torch.Tensor, image_sizes: list[tuple[int, int]], resolution: int,
                  invert: bool = False) -> torch.Tensor:
    """`masks` as PerRes Train Residuals prepares them for images of these (height, width) sizes: checked
    against their images (matched_masks), then fitted through each image's centre crop (bucket_images)."""
    images = [torch.zeros(height, width, 3) for height, width in image_sizes]
    return bucket_images(images, resolution, "center", matched_masks([masks], image_sizes, invert))[0].masks


def test_masks_are_cropped_exactly_like_their_images():
    """A mask equal to one colour channel of its (non-square) image comes out equal to that channel of the
    cropped image: same crop, same resize."""
    image = torch.rand(96, 80, 3, generator=torch.Generator().manual_seed(0))
    cropped_image = prepare_batch([image], 64)
    cropped_mask = trained_masks(image[None, ..., 0], [(96, 80)], 64)
    assert torch.equal(cropped_mask[0], cropped_image[0, ..., 0])
    # and the alpha of an RGBA file goes through the same crop as its colours
    rgba = torch.cat([image, image[..., :1]], dim=-1)
    bucket = bucket_images([rgba], 64, "center", [alpha_mask(rgba)])[0]
    assert torch.equal(bucket.masks[0], cropped_image[0, ..., 0])


def test_alpha_mask_is_one_without_alpha():
    assert torch.equal(alpha_mask(torch.rand(8, 8, 3)), torch.ones(8, 8))
    gray_alpha = torch.rand(8, 8, 2)
    assert torch.equal(alpha_mask(gray_alpha), gray_alpha[..., 1])


def test_one_mask_serves_all_images_and_invert_flips_it():
    mask = torch.zeros(64, 64)
    mask[16:48, 16:48] = 1.0
    out = trained_masks(mask, [(64, 64)] * 3, 64)
    assert out.shape == (3, 64, 64) and torch.equal(out[2], mask)
    assert torch.equal(trained_masks(mask[None], [(64, 64)], 64, invert=True)[0], 1.0 - mask)


def test_a_mask_of_another_size_with_the_images_aspect_ratio_is_scaled():
    """The stock Load Image's mask of a file without alpha is 64×64 whatever the image size."""
    out = trained_masks(torch.ones(1, 64, 64), [(512, 512)], 128)
    assert out.shape == (1, 128, 128) and torch.allclose(out, torch.ones_like(out))


@pytest.mark.parametrize("masks, match", [
    (torch.ones(3, 64, 64), "3 masks for 2 images"),
    (torch.ones(2, 1, 64, 64), "expected a MASK batch"),
    (torch.full((2, 64, 64), 2.0), "outside \\[0, 1\\]"),
    (torch.full((2, 64, 64), float("nan")), "NaN"),
    (torch.ones(2, 64, 96), "mask 1 is 96×64 px but its image 64×64"),  # width × height
])
def test_bad_masks_are_refused_with_what_to_do(masks, match):
    with pytest.raises(PerResError, match=match):
        matched_masks([masks], [(64, 64)] * 2)


def test_loss_weights_average_the_mask_over_each_latent_cell():
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0   # left half subject
    mask[:, :4, 32:36] = 1.0  # a quarter of one cell (4×4 of 8×8 px) on the right
    weights = loss_weights(mask, (8, 8), 0.2)
    assert weights.shape == (1, 1, 8, 8)
    assert torch.allclose(weights[0, 0, :, :4], torch.ones(8, 4))
    assert torch.isclose(weights[0, 0, 0, 4], torch.tensor(0.2 + 0.8 * 0.25))
    assert torch.allclose(weights[0, 0, 1:, 4:], torch.full((7, 4), 0.2))


def test_weights_of_one_everywhere_are_the_plain_loss():
    assert loss_weights(torch.ones(2, 64, 64), (8, 8), 0.0) is None
    assert loss_weights(torch.rand(2, 64, 64) * 0.5 + 0.5, (8, 8), 1.0) is None


@pytest.mark.parametrize("background_weight", [-0.1, 1.5, float("nan")])
def test_background_weight_outside_zero_one_is_refused(background_weight):
    with pytest.raises(PerResError, match="background_weight"):
        loss_weights(torch.ones(1, 64, 64), (8, 8), background_weight)


def test_an_empty_mask_is_refused_and_the_error_mentions_inverting():
    masks = torch.ones(2, 64, 64)
    masks[1] = 0.0
    masks[1, :4, :4] = 1.0  # a quarter of a latent cell
    with pytest.raises(PerResError, match="mask 2 marks \\(almost\\) no pixel.*invert_masks"):
        loss_weights(masks, (8, 8), 0.1)


def test_weight_zero_locations_get_no_gradient_and_weighted_mean_is_normalised():
    prediction = torch.randn(2, 4, 8, 8, requires_grad=True)
    noise = torch.randn(2, 4, 8, 8)
    weights = torch.ones(2, 1, 8, 8)
    weights[:, :, :, :3] = 0.0
    loss = prediction_loss(prediction, noise, weights)
    loss.backward()
    assert torch.count_nonzero(prediction.grad[..., :3]) == 0
    assert torch.count_nonzero(prediction.grad[..., 3:]) == prediction.grad[..., 3:].numel()
    expected = (prediction - noise)[..., 3:].square().mean()
    torch.testing.assert_close(loss, expected)


class _Tiny(torch.nn.Module):
    """ε_θ = conv(x_t): a stand-in denoiser whose only parameter plays the residual."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)
        torch.nn.init.zeros_(self.conv.weight)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t, t, context):
        self.seen.append((x_t.detach().clone(), t.clone()))
        return self.conv(x_t)


def _run(steps: int, start_step: int = 0) -> _Tiny:
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model = _Tiny()
    train_residuals(model, [LatentBucket(latents, torch.zeros(1, 77, 8))], torch.linspace(0.99, 0.01, 1000),
                    model.parameters(), TrainSettings(steps=steps, batch_size=2, seed=3, start_step=start_step))
    return model


def test_a_continuation_draws_what_one_long_run_draws_at_those_steps():
    """start_step skips the first run's draws: the continuation's step k sees the images, timesteps and
    noise of step start_step + k of one long run with the same seed, not the first run's again."""
    long_run, continuation, first_run = _run(5), _run(2, start_step=3), _run(2)
    for (x_long, t_long), (x_cont, t_cont) in zip(long_run.seen[3:], continuation.seen):
        assert torch.equal(t_long, t_cont) and torch.equal(x_long, x_cont)
    assert not torch.equal(first_run.seen[0][0], continuation.seen[0][0])


def test_continuing_needs_the_same_layers_and_ranks():
    fresh = ResidualSet.create(SD1.layer_shapes(), 0.05)
    check_continuable(ResidualSet.create(SD1.layer_shapes(), 0.05), fresh)
    with pytest.raises(PerResError, match="layer input_blocks.1.1.proj_out has rank 32, but rank_ratio 0.05 gives "
                                          "rank 16. Set rank_ratio to the residual's 0.1"):
        check_continuable(ResidualSet.create(SD1.layer_shapes(), 0.1), fresh)
    partial = ResidualSet.create({k: v for k, v in SD1.layer_shapes().items() if k != "middle_block.1.proj_out"})
    with pytest.raises(PerResError, match="lack layer middle_block.1.proj_out"):
        check_continuable(partial, fresh)


def test_steps_trained_reads_the_metadata():
    assert steps_trained(ResidualSet.create({"a": (8, 8)}, training={"steps": "150"})) == 150
    assert steps_trained(ResidualSet.create({"a": (8, 8)}, training={})) is None
    assert steps_trained(ResidualSet.create({"a": (8, 8)}, training={"steps": "x"})) is None
