"""Aspect-ratio buckets and the training loop's bucket draws, on small tensors (no host needed)."""
from __future__ import annotations

import math

import pytest
import torch

from perres_core.buckets import bucket_images, bucket_size, bucket_sizes, check_crop
from perres_core.diffusion import Conditioning
from perres_core.errors import PerResError
from perres_core.images import prepare_batch, resize
from perres_core.training import LatentBucket, TrainSettings, draw_step, train_residuals


@pytest.mark.parametrize("resolution", [192, 256, 512, 768, 1024])
def test_buckets_have_sides_of_multiples_of_64_and_at_most_the_squares_area(resolution):
    sizes = bucket_sizes(resolution)
    assert (resolution, resolution) in sizes
    for height, width in sizes:
        if (height, width) != (resolution, resolution):
            assert height % 64 == 0 and width % 64 == 0
        assert height * width <= resolution * resolution
        assert max(height, width) <= 4 * min(height, width)
        assert (width, height) in sizes, "portrait and landscape buckets come in pairs"


def test_sdxl_buckets_include_the_usual_sizes():
    """The SDXL training sizes other trainers use at 1024 px."""
    assert {(1216, 832), (1152, 896), (832, 1216), (896, 1152)} <= set(bucket_sizes(1024))


def test_each_image_gets_the_bucket_of_the_closest_aspect_ratio():
    assert bucket_size(1024, 768, 512) == (576, 448)   # a 3:4 portrait photo
    assert bucket_size(768, 1024, 512) == (448, 576)
    assert bucket_size(300, 300, 512) == (512, 512)
    for height, width in [(4000, 3000), (1080, 1920), (640, 480), (1000, 1001)]:
        chosen = bucket_size(height, width, 512)
        error = abs(math.log(chosen[1] / chosen[0]) - math.log(width / height))
        assert all(error <= abs(math.log(w / h) - math.log(width / height)) + 1e-12 for h, w in bucket_sizes(512))


def test_portrait_and_landscape_images_keep_their_whole_picture():
    """An image with a bucket's aspect ratio is resized, not cropped: every row and column survives."""
    generator = torch.Generator().manual_seed(0)
    portrait, landscape = torch.rand(256, 128, 3, generator=generator), torch.rand(96, 192, 3, generator=generator)
    buckets = bucket_images([portrait, landscape], 192, "buckets")
    assert [bucket.size for bucket in buckets] == [(256, 128), (128, 256)]
    assert torch.equal(buckets[0].pixels[0], resize(portrait, (256, 128)))
    assert torch.equal(buckets[1].pixels[0], resize(landscape, (128, 256)))
    # the centre crop cuts the portrait's top and bottom quarter away
    centre = bucket_images([portrait], 192, "center")[0].pixels[0]
    assert torch.equal(centre, resize(portrait[64:192], (192, 192)))


def test_a_photo_between_buckets_loses_only_the_rounding():
    photo = torch.rand(1024, 768, 3)   # 3:4 → 448×576, a ratio of 0.778: 3.6 % of the height is cut
    (bucket,) = bucket_images([photo], 512, "buckets")
    height, width = bucket.size
    kept_height = 768 * height / width
    assert 1 - kept_height / 1024 < 0.04


def test_buckets_group_images_in_order_and_masks_follow_their_images():
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(128, 256, 3, generator=generator), torch.rand(192, 192, 3, generator=generator),
              torch.rand(64, 128, 3, generator=generator)]
    masks = [image[..., 0].clone() for image in images]
    buckets = bucket_images(images, 192, "buckets", masks)
    assert [(bucket.size, bucket.indices) for bucket in buckets] == [((128, 256), (0, 2)), ((192, 192), (1,))]
    for bucket in buckets:
        assert torch.equal(bucket.masks, bucket.pixels[..., 0])


def test_square_images_in_buckets_are_exactly_the_centre_crop():
    images = [torch.rand(80, 80, 3), torch.rand(200, 200, 3)]
    (bucket,) = bucket_images(images, 128, "buckets")
    assert bucket.size == (128, 128) and torch.equal(bucket.pixels, prepare_batch(images, 128))


def test_bad_crop_and_small_images_are_refused():
    with pytest.raises(PerResError, match="crop must be one of center, buckets"):
        check_crop("stretch")
    with pytest.raises(PerResError, match="'tiny.png' is only 40×300 px"):
        bucket_images([torch.rand(300, 40, 3)], 256, "buckets", labels=["'tiny.png'"])


def _toy_model():
    """A tiny ε-predictor whose prediction depends on the latent, the caption and one trainable scale."""
    scale = torch.nn.Parameter(torch.tensor(0.5))

    def predict(x_t, t, conditioning):
        return scale * x_t + conditioning.context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return predict, scale


def test_one_caption_for_a_bucket_trains_exactly_like_one_caption_per_image():
    latents, context = torch.randn(3, 4, 8, 8), torch.randn(1, 77, 8)
    schedule = torch.linspace(0.99, 0.01, 1000)
    settings = TrainSettings(steps=5, batch_size=2, learning_rate=1e-2, seed=3)
    predict, scale = _toy_model()
    shared = train_residuals(predict, [LatentBucket(latents, Conditioning(context))], schedule, [scale], settings)
    predict, scale = _toy_model()
    per_image = train_residuals(predict, [LatentBucket(latents, Conditioning(context.expand(3, -1, -1)))], schedule,
                                [scale], settings)
    assert shared == per_image


def test_every_batch_comes_from_one_bucket_in_proportion_to_its_images():
    seen: dict[tuple[int, int], int] = {}
    tall, wide = torch.randn(3, 4, 8, 4), torch.randn(1, 4, 4, 8)
    captions = {(8, 4): torch.full((1, 77, 8), 1.0), (4, 8): torch.full((1, 77, 8), 2.0)}

    def predict(x_t, t, conditioning):
        size = tuple(x_t.shape[-2:])
        assert torch.equal(conditioning.context[0], captions[size][0]), "a bucket got another bucket's caption"
        seen[size] = seen.get(size, 0) + 1
        return x_t * scale
    scale = torch.nn.Parameter(torch.tensor(1.0))
    buckets = [LatentBucket(tall, Conditioning(captions[(8, 4)])), LatentBucket(wide, Conditioning(captions[(4, 8)]))]
    train_residuals(predict, buckets, torch.linspace(0.99, 0.01, 1000), [scale],
                    TrainSettings(steps=200, batch_size=2, learning_rate=1e-4, seed=0))
    assert set(seen) == {(8, 4), (4, 8)}
    assert 0.6 < seen[(8, 4)] / 200 < 0.9, seen   # 3 of the 4 images are tall


def test_draws_are_unchanged_for_a_plain_tensor():
    """The draw order of earlier releases (indices, t, noise) is kept, so old seeds reproduce."""
    generator = torch.Generator().manual_seed(9)
    index, t, noise = draw_step(4, 2, (4, 8, 8), 1000, generator)
    again = torch.Generator().manual_seed(9)
    assert torch.equal(index, torch.randperm(4, generator=again)[:2])
    assert torch.equal(t, torch.randint(0, 1000, (2,), generator=again))
    assert torch.equal(noise, torch.randn((2, 4, 8, 8), generator=again))
