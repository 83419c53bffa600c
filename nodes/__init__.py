"""ComfyUI glue of PerRes: thin node classes over perres_core."""
from __future__ import annotations

import logging

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .apply_node import ApplyResiduals
from .file_nodes import LoadResiduals, SaveResiduals
from .host.entry_points import log_host_check
from .image_nodes import LoadConceptImages
from .lag_nodes import LagConceptNode, LagLoraNode, LagMaskPreview, LagSampling
from .suggest_node import SuggestClassWord
from .train_node import TrainResiduals

log = logging.getLogger("perres")

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
        # Called once, when ComfyUI loads the pack, by every host (ComfyUI 0.3.64 never calls on_load).
        log_host_check()  # the console names any missing entry point
        return [node for node in NODES if _schema_builds(node)]


def _schema_builds(node: type[io.ComfyNode]) -> bool:
    """A node whose schema a moved host API breaks is left out alone (with the reason in the console), instead of
    ComfyUI dropping the whole pack when registering it raises."""
    try:
        node.GET_SCHEMA()
        return True
    except Exception as exc:  # whatever the host's schema code raises
        log.error("PerRes: %s cannot be registered in this ComfyUI: %s: %s. The other PerRes nodes are.",
                  node.__name__, type(exc).__name__, exc)
        return False
