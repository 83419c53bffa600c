"""PerRes: personalized residuals and localized attention-guided sampling for ComfyUI (SD1.x).

ComfyUI imports this package from custom_nodes/ and calls `comfy_entrypoint` (V3 node API).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .nodes import PerResExtension

WEB_DIRECTORY = None


async def comfy_entrypoint() -> PerResExtension:
    # Imported here, not at the top: importing this file then needs no parent package and has no side
    # effects (pytest imports a rootdir __init__.py on its own, as "__init__" when the checkout's folder
    # name is no valid module name, e.g. "perres-main").
    from .nodes import PerResExtension

    return PerResExtension()
