"""PerRes: personalized residuals and localized attention-guided sampling for ComfyUI (SD1.x and the SDXL family).

ComfyUI imports this package from custom_nodes/ and calls `comfy_entrypoint` (V3 node API). The tests
never import it as a package (tests/pack_root_plugin.py); they load it the way ComfyUI does.
"""
import logging

# Served at /extensions/<pack folder>/; holds the node help pages docs/<NodeId>.md (tools/make_docs.py).
WEB_DIRECTORY = "web"

try:
    import comfy_api.latest  # noqa: F401  (the V3 node API: the one host module PerRes cannot register without)
except ImportError as exc:
    logging.getLogger("perres").error(
        "PerRes needs ComfyUI's V3 node API (comfy_api.latest, ComfyUI 0.3.64 or newer), which this ComfyUI does "
        "not have (%s). Update ComfyUI; PerRes's nodes are not loaded.", exc)
else:
    from .nodes import PerResExtension

    async def comfy_entrypoint() -> PerResExtension:
        return PerResExtension()
