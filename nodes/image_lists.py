"""Images as list inputs: nodes with is_input_list receive every input as a list, and IMAGE/MASK lists may hold
batches of different sizes (PerRes Load Concept Images with crop 'buckets', the stock Load Image Dataset from
Folder)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

CROP_TOOLTIP = ("center: each image is centre-cropped to a resolution × resolution square (the paper's setting). "
                "buckets: each image keeps its aspect ratio at about resolution² pixels (sides multiples of 64), "
                "so portrait and landscape photos keep their whole picture; each step's batch comes from one "
                "size. Masks follow their images either way.")


def single_values(inputs: dict) -> dict:
    """The one value of each list input that is not a batch list."""
    return {name: values[0] for name, values in inputs.items()}


def images_of(batches: Optional[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Every (H, W, C) image of a list of IMAGE batches, in order."""
    return [image for batch in batches or [] if batch is not None for image in batch]
