"""Aspect-ratio buckets: photos that are not square keep their whole picture.

The paper centre-crops every reference image to a square (the `center` crop, PerRes' default). A portrait
phone photo then loses its top and bottom, and with them perhaps the subject's head. With `buckets` each
image is instead fitted to the bucket whose aspect ratio is closest to its own: sides multiples of 64, at
most resolution² pixels (the memory of the square), the bucket list of kohya's sd-scripts and of ComfyUI's
ResolutionBucket node. Only the rounding to the bucket's ratio is cut off (a few percent of one side), and
each training step draws its whole batch from one bucket, so every batch is a single tensor.

Square images land in the resolution × resolution bucket, and with one bucket the training draws are
exactly those of the centre crop: buckets of square photos train exactly what the paper's crop trains.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .errors import PerResError
from .images import check_resolution, check_side, fit, to_rgb

CROPS: tuple[str, ...] = ("center", "buckets")
BUCKET_STEP = 64    # latent sides of multiples of 8, which every UNet level divides
MAX_ASPECT = 4.0    # the longest bucket side is at most 4× the shortest (sd-scripts' limit as well)


def check_crop(crop: str) -> str:
    if crop not in CROPS:
        raise PerResError(f"crop must be one of {', '.join(CROPS)}, got '{crop}'. center: the paper's square "
                          "crop; buckets: each image keeps its aspect ratio.")
    return crop


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """Every (height, width) bucket at `resolution`: for each side a multiple of 64, the longest multiple of 64
    for the other side that keeps the area within resolution², both ways round; and the resolution ×
    resolution square itself."""
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    for side in range(BUCKET_STEP, int(resolution * MAX_ASPECT) + 1, BUCKET_STEP):
        other = area // side // BUCKET_STEP * BUCKET_STEP
        if other >= BUCKET_STEP and max(side, other) <= MAX_ASPECT * min(side, other):
            sizes.update({(other, side), (side, other)})
    return sorted(sizes)


def bucket_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """The bucket of an image of height × width: the closest aspect ratio (in log ratio), then the larger area."""
    aspect = math.log(width / height)
    return min(bucket_sizes(resolution),
               key=lambda size: (round(abs(math.log(size[1] / size[0]) - aspect), 9), -size[0] * size[1]))


def target_size(height: int, width: int, resolution: int, crop: str) -> tuple[int, int]:
    """(height, width) an image of height × width is trained at."""
    return (resolution, resolution) if check_crop(crop) == "center" else bucket_size(height, width, resolution)


@dataclass(frozen=True)
class ImageBucket:
    """The reference images of one training size, in pixels, with their subject masks."""

    size: tuple[int, int]               # (height, width)
    indices: tuple[int, ...]            # each image's position in the input order
    pixels: torch.Tensor                # (n, height, width, 3), RGB in [0, 1]
    masks: Optional[torch.Tensor] = None  # (n, height, width), 1 = subject

    def __len__(self) -> int:
        return len(self.indices)


def bucket_images(images: Sequence[torch.Tensor], resolution: int, crop: str,
                  masks: Optional[Sequence[torch.Tensor]] = None,
                  labels: Optional[Sequence[str]] = None) -> list[ImageBucket]:
    """(H_i, W_i, C_i) images of any sizes → their buckets in order of first appearance (one bucket of
    resolution² squares for `center`). masks: one (H, W) per image, checked by images.matched_masks; each
    goes through its image's geometry."""
    if not images:
        raise PerResError("no reference images were given.")
    check_resolution(resolution)
    labels = list(labels or ["an image"] * len(images))
    groups: dict[tuple[int, int], list[int]] = {}
    for index, (image, label) in enumerate(zip(images, labels)):
        check_side(image, label)
        groups.setdefault(target_size(image.shape[0], image.shape[1], resolution, crop), []).append(index)
    buckets = []
    for size, indices in groups.items():
        pixels = torch.stack([fit(to_rgb(images[i]), size) for i in indices])
        fitted_masks = None if masks is None else torch.stack([fit(masks[i][..., None], size)[..., 0] for i in indices])
        buckets.append(ImageBucket(size, tuple(indices), pixels, fitted_masks))
    return buckets


def describe_buckets(buckets: Sequence[ImageBucket]) -> str:
    """e.g. '3 × 448×576, 2 × 512×512' (width × height, as image sizes are usually written)."""
    return ", ".join(f"{len(bucket)} × {bucket.size[1]}×{bucket.size[0]}" for bucket in buckets)
