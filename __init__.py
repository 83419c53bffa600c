"""PerRes: personalized residuals and localized attention-guided sampling for ComfyUI (SD1.x).

ComfyUI imports this package from custom_nodes/ and calls `comfy_entrypoint` (V3 node API).
"""
from .nodes import PerResExtension

# Served at /extensions/<pack folder>/; holds the node help pages docs/<NodeId>.md (tools/make_docs.py).
WEB_DIRECTORY = "web"


async def comfy_entrypoint() -> PerResExtension:
    return PerResExtension()
