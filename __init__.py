"""PerRes: personalized residuals and localized attention-guided sampling for ComfyUI (SD1.x).

ComfyUI imports this package from custom_nodes/ and calls `comfy_entrypoint` (V3 node API). The tests
never import it as a package (tests/pack_root_plugin.py); they load it the way ComfyUI does.
"""
from .nodes import PerResExtension

# Served at /extensions/<pack folder>/; holds the node help pages docs/<NodeId>.md (tools/make_docs.py).
WEB_DIRECTORY = "web"


async def comfy_entrypoint() -> PerResExtension:
    return PerResExtension()
