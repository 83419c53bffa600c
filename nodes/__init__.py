"""ComfyUI glue of PerRes: thin node classes over perres_core."""
from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .apply_node import ApplyResiduals
from .file_nodes import LoadResiduals, SaveResiduals
from .image_nodes import LoadConceptImages
from .lag_nodes import LagConceptNode, LagLoraNode, LagMaskPreview, LagSampling
from .suggest_node import SuggestClassWord
from .train_node import TrainResiduals

NODES: list[type[io.ComfyNode]] = [
    LoadConceptImages,
    SuggestClassWord,
    TrainResiduals,
    SaveResiduals,
    LoadResiduals,
    ApplyResiduals,
    LagSampling,
    LagConceptNode,
    LagLoraNode,
    LagMaskPreview,
]


class PerResExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
