"""Reference images and their subject masks: normalising channels and centre-cropping to the training resolution.

A subject mask is 1 where a pixel shows the concept and 0 on the background (an image's alpha: opaque = 1).
"""
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


def alpha_mask(image: torch.Tensor) -> torch.Tensor:
    """(H, W, C) → (H, W): the alpha channel of gray+alpha and RGBA images, 1 (opaque) for the others."""
    if image.shape[-1] in (2, 4):
        return image[..., -1]
    return torch.ones(image.shape[:-1], dtype=image.dtype)


def center_crop_resize(image: torch.Tensor, size: int, label: str = "an image") -> torch.Tensor:
    """(H, W, C) → (size, size, C): the largest centred square, resized with antialiasing.

    `label` names the image in the error for one that is too small (e.g. its file name).
    """
    height, width = image.shape[0], image.shape[1]
    if min(height, width) < MIN_SIDE:
        raise PerResError(f"{label} is only {width}×{height} px; reference images must be at least "
                          f"{MIN_SIDE} px on each side. Replace it with a larger photo or remove it.")
    return _square_resize(image, size)


def _square_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(H, W, C) → (size, size, C) without size checks: the one crop that images and their masks share."""
    height, width = image.shape[0], image.shape[1]
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


def prepare_masks(images: list[torch.Tensor], size: int, labels: list[str] | None = None) -> torch.Tensor:
    """The alpha of each image (1 where it has none), cropped exactly as prepare_batch crops the images:
    (N, size, size), 1 = opaque = the subject."""
    labels = labels or ["an image"] * len(images)
    return torch.stack([center_crop_resize(alpha_mask(image)[..., None], size, label)[..., 0]
                        for image, label in zip(images, labels)])


def subject_masks(masks: torch.Tensor, num_images: int, image_size: tuple[int, int], size: int,
                  invert: bool = False) -> torch.Tensor:
    """MASK input (N, H, W) or (H, W), 1 = subject (0 with `invert`) → (num_images, size, size), cropped
    and resized like the images of height × width `image_size`.

    One mask serves every image. A mask of another size than the images must have their aspect ratio (the
    stock Load Image gives 64×64 for files without alpha); it is then scaled to the images' crop.
    """
    fix = ("Connect one mask per image, in the images' order (PerRes Load Concept Images' `masks`, or a "
           "masking node fed with the same images).")
    if masks.dim() == 2:
        masks = masks.unsqueeze(0)
    if masks.dim() != 3:
        raise PerResError(f"masks have shape {tuple(masks.shape)}; expected a MASK batch (N, height, width). {fix}")
    if masks.shape[0] not in (1, num_images):
        raise PerResError(f"{masks.shape[0]} masks for {num_images} images; give one mask per image, or one "
                          f"for all. {fix}")
    masks = masks.float().cpu()
    if not torch.isfinite(masks).all() or masks.min() < -1e-3 or masks.max() > 1 + 1e-3:
        raise PerResError("masks must hold values between 0 and 1 (1 = the subject); these contain "
                          f"{'NaN or Inf' if not torch.isfinite(masks).all() else 'values outside [0, 1]'}. "
                          "Connect a MASK from a masking node, not an image or a latent.")
    height, width = image_size
    mask_height, mask_width = masks.shape[1], masks.shape[2]
    # the same aspect ratio up to one pixel of rounding on the longer side
    if abs(mask_height * width - mask_width * height) > max(height, width, mask_height, mask_width):
        raise PerResError(f"the masks are {mask_width}×{mask_height} px but the images {width}×{height} px; "
                          "a mask must cover the same picture as its image. Make the masks from the same "
                          "images, or resize them together.")
    masks = masks.clamp(0.0, 1.0)
    if invert:
        masks = 1.0 - masks
    cropped = _square_resize(masks.movedim(0, -1), size).movedim(-1, 0)  # masks as channels: one crop for all
    return cropped.expand(num_images, size, size).contiguous()
