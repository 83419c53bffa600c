"""Reference images: normalising channels and centre-cropping to the training resolution."""
from __future__ import annotations

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


def center_crop_resize(image: torch.Tensor, size: int, label: str = "an image") -> torch.Tensor:
    """(H, W, 3) → (size, size, 3): the largest centred square, resized with antialiasing.

    `label` names the image in the error for one that is too small (e.g. its file name).
    """
    height, width = image.shape[0], image.shape[1]
    if min(height, width) < MIN_SIDE:
        raise PerResError(f"{label} is only {width}×{height} px; reference images must be at least "
                          f"{MIN_SIDE} px on each side. Replace it with a larger photo or remove it.")
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top:top + side, left:left + side]
    chw = square.movedim(-1, 0).unsqueeze(0).float()
    resized = F.interpolate(chw, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized.squeeze(0).movedim(0, -1).clamp(0.0, 1.0)


def prepare_batch(images: list[torch.Tensor], size: int, labels: list[str] | None = None) -> torch.Tensor:
    """A list of (H_i, W_i, C_i) images of any sizes → one (N, size, size, 3) batch.

    labels, one per image, name the images in errors (file names); by default "an image".
    """
    if not images:
        raise PerResError("no reference images were given.")
    if size < MIN_SIDE or size % 8:
        raise PerResError(f"resolution must be a multiple of 8 and at least {MIN_SIDE}, got {size}; "
                          "512 suits SD1.x.")
    labels = labels or ["an image"] * len(images)
    return torch.stack([center_crop_resize(to_rgb(image), size, label) for image, label in zip(images, labels)])
