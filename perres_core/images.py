"""Reference images and their subject masks: normalising channels, and fitting them to the training geometry.

Two geometries (the `crop` choice): the paper's centre crop to a resolution × resolution square, and
aspect-ratio buckets (perres_core.buckets), where each image keeps its whole picture at about resolution²
pixels. A mask always goes through the same geometry as its image.

A subject mask is 1 where a pixel shows the concept and 0 on the background (an image's alpha: opaque = 1).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import PerResError

MIN_SIDE = 64  # below this an image carries too little detail to teach a concept


def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """(H, W, C) float in [0, 1] with C ∈ {1, 2, 3, 4} → (H, W, 3); alpha is composited over white."""
    channels = image.shape[-1]
    if channels == 3:
        return image
    if channels == 1:
        return image.expand(*image.shape[:-1], 3)
    if channels == 2:  # gray + alpha
        gray, alpha = image[..., :1], image[..., 1:2]
        return (gray * alpha + (1 - alpha)).expand(*image.shape[:-1], 3)
    if channels == 4:
        rgb, alpha = image[..., :3], image[..., 3:4]
        return rgb * alpha + (1 - alpha)
    raise PerResError(f"an image has {channels} channels; expected grayscale, RGB or RGBA.")


def alpha_mask(image: torch.Tensor) -> torch.Tensor:
    """(H, W, C) → (H, W): the alpha channel of gray+alpha and RGBA images, 1 (opaque) for the others."""
    if image.shape[-1] in (2, 4):
        return image[..., -1]
    return torch.ones(image.shape[:-1], dtype=image.dtype)


def center_crop_resize(image: torch.Tensor, size: int, label: str = "an image") -> torch.Tensor:
    """(H, W, C) → (size, size, C): the largest centred square, resized with antialiasing.

    `label` names the image in the error for one that is too small (e.g. its file name).
    """
    check_side(image, label)
    return fit(image, (size, size))


def fit(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, C) → (height, width, C) of `size` without size checks: the largest centred region with the
    target's aspect ratio, resized. The one geometry that images and their masks share; for a square target
    it is the paper's centre crop."""
    height, width = image.shape[0], image.shape[1]
    target_height, target_width = size
    if target_height == target_width:
        crop_height = crop_width = min(height, width)
    else:  # keep the whole side that limits, cut the other to the target's aspect ratio
        crop_height = min(height, round(width * target_height / target_width))
        crop_width = min(width, round(height * target_width / target_height))
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return resize(image[top:top + crop_height, left:left + crop_width], size)


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, C) → (height, width, C) of `size`, bicubic with antialiasing, clamped to [0, 1]."""
    chw = image.movedim(-1, 0).unsqueeze(0).float()
    resized = F.interpolate(chw, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
    return resized.squeeze(0).movedim(0, -1).clamp(0.0, 1.0)


def check_resolution(size: int) -> None:
    if size < MIN_SIDE or size % 8:
        raise PerResError(f"resolution must be a multiple of 8 and at least {MIN_SIDE}, got {size}; "
                          "512 suits SD1.x, 1024 SDXL.")


def check_side(image: torch.Tensor, label: str) -> None:
    height, width = image.shape[0], image.shape[1]
    if min(height, width) < MIN_SIDE:
        raise PerResError(f"{label} is only {width}×{height} px; reference images must be at least "
                          f"{MIN_SIDE} px on each side. Replace it with a larger photo or remove it.")


def prepare_batch(images: list[torch.Tensor], size: int, labels: list[str] | None = None) -> torch.Tensor:
    """A list of (H_i, W_i, C_i) images of any sizes → one (N, size, size, 3) batch.

    labels, one per image, name the images in errors (file names); by default "an image".
    """
    if not images:
        raise PerResError("no reference images were given.")
    check_resolution(size)
    labels = labels or ["an image"] * len(images)
    return torch.stack([center_crop_resize(to_rgb(image), size, label) for image, label in zip(images, labels)])


def matched_masks(masks: Sequence[torch.Tensor], image_sizes: Sequence[tuple[int, int]],
                  invert: bool = False) -> list[torch.Tensor]:
    """MASK inputs, each (N, H, W) or (H, W), 1 = subject (0 with `invert`) → one (H_m, W_m) mask per image,
    checked against that image's height × width, not yet cropped (fit() crops a mask like its image).

    One mask serves every image. A mask of another size than its image must have the image's aspect ratio
    (the stock Load Image gives 64×64 for files without alpha); the shared geometry then scales it.
    """
    fix = ("Connect one mask per image, in the images' order (PerRes Load Concept Images' `masks`, or a "
           "masking node fed with the same images).")
    rows: list[torch.Tensor] = []
    for batch in masks:
        batch = batch.unsqueeze(0) if batch.dim() == 2 else batch
        if batch.dim() != 3:
            raise PerResError(f"masks have shape {tuple(batch.shape)}; expected a MASK batch (N, height, width). "
                              f"{fix}")
        rows.extend(batch.float().cpu())
    if len(rows) not in (1, len(image_sizes)):
        raise PerResError(f"{len(rows)} masks for {len(image_sizes)} images; give one mask per image, or one "
                          f"for all. {fix}")
    checked = []
    for number, (mask, (height, width)) in enumerate(zip(rows * len(image_sizes) if len(rows) == 1 else rows,
                                                          image_sizes), start=1):
        if not torch.isfinite(mask).all() or mask.min() < -1e-3 or mask.max() > 1 + 1e-3:
            raise PerResError("masks must hold values between 0 and 1 (1 = the subject); these contain "
                              f"{'NaN or Inf' if not torch.isfinite(mask).all() else 'values outside [0, 1]'}. "
                              "Connect a MASK from a masking node, not an image or a latent.")
        mask_height, mask_width = mask.shape
        # the same aspect ratio up to one pixel of rounding on the longer side
        if abs(mask_height * width - mask_width * height) > max(height, width, mask_height, mask_width):
            raise PerResError(f"mask {number} is {mask_width}×{mask_height} px but its image {width}×{height} px; "
                              "a mask must cover the same picture as its image. Make the masks from the same "
                              "images, or resize them together.")
        mask = mask.clamp(0.0, 1.0)
        checked.append(1.0 - mask if invert else mask)
    return checked

