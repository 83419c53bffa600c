"""Photos that are not square, in the real host: PerRes Load Concept Images and Train Residuals with
crop 'buckets' keep each picture whole, train from one bucket per step and learn the whole picture."""
from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from conftest import pack, run_node
from host_helpers import TRAIN_DEFAULTS, held_out_loss, layers_equal, train, untrained_residuals

RESOLUTION = 192  # buckets at 192 px: 128×256, 192×192, 256×128 (width × height)


def two_to_one(height: int, width: int, seed: int) -> torch.Tensor:
    """A 2:1 picture whose two ends differ (red at one end, blue at the other) over mild noise: what a
    centre crop of it throws away is not what it keeps."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(height, width, 3, generator=generator) * 0.2 + 0.3
    if height > width:
        image[: height // 4, :, 0], image[-height // 4:, :, 2] = 0.95, 0.95
    else:
        image[:, : width // 4, 0], image[:, -width // 4:, 2] = 0.95, 0.95
    return image


@pytest.fixture(scope="module")
def photo_folder(workdir) -> str:
    """A portrait, a landscape and a square photo, as files in ComfyUI's input folder."""
    import folder_paths

    folder = os.path.join(folder_paths.get_input_directory(), "perres_bucket_tests")
    os.makedirs(folder, exist_ok=True)
    for name, image in (("a_portrait.png", two_to_one(256, 128, 0)), ("b_landscape.png", two_to_one(128, 256, 1)),
                        ("c_square.png", torch.rand(160, 160, 3, generator=torch.Generator().manual_seed(2)))):
        Image.fromarray((image * 255).round().byte().numpy()).save(os.path.join(folder, name))
    return "perres_bucket_tests"


def test_load_concept_images_in_buckets_keeps_every_photo_whole(photo_folder):
    images_module = pack("perres_core.images")
    path = pack("nodes.image_nodes").resolve_input_folder(photo_folder)
    batches, masks = run_node("PerResLoadConceptImages", folder=photo_folder, resolution=RESOLUTION, crop="buckets")
    assert [tuple(b.shape) for b in batches] == [(1, 256, 128, 3), (1, 128, 256, 3), (1, 192, 192, 3)]
    assert [tuple(m.shape) for m in masks] == [(1, 256, 128), (1, 128, 256), (1, 192, 192)]
    for batch, name in zip(batches, sorted(os.listdir(path))):
        whole = pack("nodes.image_nodes").read_image(os.path.join(path, name))
        assert torch.equal(batch[0], images_module.resize(whole, tuple(batch.shape[1:3])))
    # crop center: one square batch, as before
    (square,), (square_masks,) = run_node("PerResLoadConceptImages", folder=photo_folder, resolution=RESOLUTION)
    assert square.shape == (3, 192, 192, 3) and square_masks.shape == (3, 192, 192)


def test_training_from_the_bucket_lists_records_the_buckets(sd15, photo_folder):
    batches, masks = run_node("PerResLoadConceptImages", folder=photo_folder, resolution=RESOLUTION, crop="buckets")
    model, clip, vae = sd15
    _, residuals, loss, _ = run_node("PerResTrainResiduals", model=model, clip=clip, vae=vae, images=batches,
                                     masks=masks, **{**TRAIN_DEFAULTS, "resolution": RESOLUTION, "steps": 3,
                                                     "gradient_checkpointing": False}, crop="buckets")
    assert len(loss["loss"]) == 3 and all(torch.isfinite(torch.tensor(loss["loss"])))
    assert residuals.training["crop"] == "buckets"
    assert residuals.training["buckets"] == "1 × 128×256, 1 × 256×128, 1 × 192×192"
    assert residuals.training["num_images"] == 3


def test_square_images_in_buckets_train_exactly_what_the_centre_crop_trains(sd15, concept_images):
    centre = train(sd15, concept_images, steps=3, seed=8)[1]
    bucketed = train(sd15, concept_images, steps=3, seed=8, crop="buckets")[1]
    assert layers_equal(centre, bucketed)


def test_bucketed_training_learns_the_whole_picture_better(sd15):
    """Four portrait photos: training with buckets lowers the loss on the whole pictures (at noise and
    timesteps training never draws) more than training on their centre crops does."""
    model, clip, vae = sd15
    photos = torch.stack([two_to_one(256, 128, seed) for seed in range(10, 14)])
    settings = dict(steps=8, batch_size=2, seed=4, learning_rate=3e-3, resolution=RESOLUTION,
                    gradient_checkpointing=False)
    centre = train(sd15, photos, **settings)[1]
    bucketed = train(sd15, photos, crop="buckets", **settings)[1]
    before = held_out_loss(model, clip, vae, photos, untrained_residuals(4))
    after_centre = held_out_loss(model, clip, vae, photos, centre)
    after_buckets = held_out_loss(model, clip, vae, photos, bucketed)
    assert after_buckets < before, (before, after_buckets)
    assert after_buckets < after_centre, f"buckets {after_buckets:.5f} vs centre crop {after_centre:.5f}"
