"""PerRes Load Concept Images: a folder of reference images → a training batch (centre-cropped, or one batch per
aspect-ratio bucket) and its subject masks."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps

from comfy_api.latest import io

from .host.entry_points import folder_paths
from ..perres_core.errors import PerResError
from ..perres_core.buckets import CROPS, bucket_images, describe_buckets
from ..perres_core.images import alpha_mask
from .node_guard import guarded
from .node_warnings import NodeWarnings, node_id_of
from .image_lists import CROP_TOOLTIP

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
NAME = "PerRes Load Concept Images"
# PIL mode → the mode read: palettes may carry transparency, so they keep an alpha channel (→ masks output)
DECODED_MODES = {"L": "L", "LA": "LA", "RGBA": "RGBA", "P": "RGBA", "PA": "RGBA", "I;16": "L", "I": "L", "F": "L"}
MAX_PIXELS = 8192 * 8192  # refuse decompression bombs; 4096+ px photos are fine and get downscaled


BUNDLED_IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_images")


def resolve_input_folder(folder: str) -> str:
    """`folder` relative to ComfyUI's input directory, else to the pack's bundled example_images/.

    Anything that escapes those directories is refused.
    """
    if not folder.strip():
        raise PerResError("folder is empty; give a folder inside ComfyUI's input directory, e.g. 'perres/dog'.")
    input_root = os.path.realpath(folder_paths.get_input_directory())
    for root in (input_root, os.path.realpath(BUNDLED_IMAGES)):
        path = os.path.realpath(os.path.join(root, folder.strip()))
        if os.path.commonpath([root, path]) != root:
            raise PerResError(f"folder '{folder}' is outside ComfyUI's input directory; give a path relative to it.")
        if os.path.isdir(path):
            return path
    raise PerResError(f"folder '{folder}' does not exist in ComfyUI's input directory ({input_root}).")


def read_image(path: str) -> torch.Tensor:
    with Image.open(path) as image:
        if image.width * image.height > MAX_PIXELS:
            raise PerResError(f"'{os.path.basename(path)}' is {image.width}×{image.height} px, more than the "
                              f"{MAX_PIXELS / 1e6:.0f} megapixels PerRes reads; downscale it first "
                              "(it is resized to the training resolution anyway).")
        image = ImageOps.exif_transpose(image)
        mode = DECODED_MODES.get(image.mode, "RGB")
        array = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array.copy())


class LoadConceptImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerResLoadConceptImages",
            display_name=NAME,
            category="PerRes",
            description="Loads every image in a folder under ComfyUI's input directory (any sizes, grayscale, RGB "
                        "or RGBA) and centre-crops and resizes them into one batch for training, or with crop "
                        "'buckets' fits each into the aspect-ratio bucket closest to its own (one batch per "
                        "bucket, as a list). Transparent pixels are shown over white, and the alpha channels "
                        "become subject masks.",
            inputs=[
                io.String.Input("folder", default="perres_example",
                                tooltip="Folder inside ComfyUI/input holding 3–20 photos of the concept."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=8,
                             tooltip="Side of the square training images (crop center), or of the square whose "
                                     "area the buckets keep (crop buckets); 512 for SD1.x, 1024 for SDXL."),
                io.Combo.Input("crop", options=list(CROPS), default="center", optional=True, tooltip=CROP_TOOLTIP),
            ],
            outputs=[io.Image.Output(display_name="images", is_output_list=True,
                                     tooltip="The reference images: one batch (crop center), or one batch per "
                                             "bucket (crop buckets). A list, so PerRes Train Residuals gets every "
                                             "bucket at once; other nodes run once per batch."),
                     io.Mask.Output(display_name="masks", is_output_list=True,
                                    tooltip="Each image's alpha, cropped like the image: 1 = opaque (the subject of "
                                            "a cut-out), 0 = transparent; all 1 for images without alpha. The "
                                            "inverse of the stock Load Image's mask. For PerRes Train Residuals' "
                                            "masks. Batched like the images.")],
            hidden=[io.Hidden.unique_id],  # to show warnings on the node
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, resolution: int, crop: str = "center"):
        # Re-run when files in the folder change.
        try:
            path = resolve_input_folder(folder)
        except PerResError:
            return float("nan")
        return tuple(sorted((n, os.path.getmtime(os.path.join(path, n))) for n in os.listdir(path)))

    @classmethod
    @guarded
    def execute(cls, folder: str, resolution: int, crop: str = "center") -> io.NodeOutput:
        path = resolve_input_folder(folder)
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise PerResError(f"folder '{folder}' has no images ({', '.join(IMAGE_EXTENSIONS)}).")
        images = []
        for name in names:
            try:
                images.append(read_image(os.path.join(path, name)))
            except PerResError:
                raise
            except Exception as exc:
                raise PerResError(f"'{name}' in folder '{folder}' cannot be read as an image ({exc}); "
                                  "remove or replace it.") from exc
        labels = [f"'{name}'" for name in names]
        try:
            buckets = bucket_images(images, resolution, crop, [alpha_mask(image) for image in images], labels)
        except PerResError as exc:
            raise PerResError(f"{exc} (folder '{folder}')") from exc
        warnings = NodeWarnings(NAME, node_id_of(cls))
        if len(names) == 1:
            warnings.warn(f"only one reference image in '{folder}'; 3 or more generalise much better.")
        if crop == "buckets":
            warnings.show_result(f"{len(names)} images in buckets (width×height): {describe_buckets(buckets)}")
        return io.NodeOutput([bucket.pixels for bucket in buckets], [bucket.masks for bucket in buckets])
