"""Drive the real ComfyUI frontend (the comfyui-frontend-package the host serves) in headless Chromium.

Used by tests/test_ui.py (checks every example workflow as the frontend sees it) and by
tools/make_thumbnails.py (screenshots of the same graphs for the template browser and the README).
Playwright drives Debian's /usr/bin/chromium; its own browser download is never used, so nothing is
fetched at run time. `.ci/install-browser` installs both.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Optional

from comfy_host import PACK_DIR
from comfy_server import write_residual
from lora_files import placeholder_lora
from sd15_checkpoint import link_sd15_checkpoint

CHROMIUM = os.environ.get("PERRES_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
                 "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
INSTALL_HINT = "run .ci/install-browser (Debian's chromium via apt-get, playwright via the host venv's pip)"
APP_TIMEOUT_MS = 120_000
EXAMPLES_DIR = os.path.join(PACK_DIR, "example_workflows")
API_DIR = os.path.join(EXAMPLES_DIR, "api")
# Frontend settings of the test user: no first-run template dialog, no minimap or canvas menu over the
# graph (they would cover nodes in the thumbnails), no dialog when a node type is missing (the checks
# read the graph instead, so a missing type fails with its name rather than hanging on a dialog).
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasMenu": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Workflow.ShowMissingNodesWarning": False,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
}


def missing_browser() -> Optional[str]:
    """Why the frontend cannot be driven here, or None when Chromium and playwright are installed."""
    problems = []
    if not os.access(CHROMIUM, os.X_OK):
        problems.append(f"no Chromium at {CHROMIUM}")
    if importlib.util.find_spec("playwright") is None:
        problems.append("the Python package playwright is not installed")
    return "; ".join(problems) + f": {INSTALL_HINT}" if problems else None


def example_names() -> list[str]:
    return sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(EXAMPLES_DIR, "*.json")))


def load_example(name: str, api: bool = False) -> dict:
    with open(os.path.join(API_DIR if api else EXAMPLES_DIR, name + ".json"), encoding="utf-8") as handle:
        return json.load(handle)


# the loaders of the diffusion transformers' workflows: input → models folder
DIT_FILE_FOLDERS = {"unet_name": "diffusion_models", "clip_name": "text_encoders", "vae_name": "vae"}


def prepare_frontend_root(root: str) -> None:
    """Settings for the frontend, and every model file the example workflows name, so that each combo
    value is one of its options: the random SD1.5 checkpoint, placeholder residuals written by the pack's own
    writer, and empty files under the DiT loaders' names."""
    settings_dir = os.path.join(root, "user", "default")
    os.makedirs(settings_dir, exist_ok=True)
    with open(os.path.join(settings_dir, "comfy.settings.json"), "w", encoding="utf-8") as handle:
        json.dump(SETTINGS, handle)
    for name in example_names():
        for node in load_example(name, api=True).values():
            inputs = node["inputs"]
            if "ckpt_name" in inputs:
                link_sd15_checkpoint(root, inputs["ckpt_name"])
            if "residual_name" in inputs:
                target = os.path.join(root, "models", "loras", inputs["residual_name"])
                if not os.path.exists(target):
                    write_residual(target)
            if "lora_name" in inputs:
                target = os.path.join(root, "models", "loras", inputs["lora_name"])
                if not os.path.exists(target):
                    placeholder_lora(target)
            for key, folder in DIT_FILE_FOLDERS.items():  # only listed, never loaded: an empty file will do
                if key in inputs:
                    target = os.path.join(root, "models", folder, inputs[key])
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    open(target, "ab").close()


# Runs in the page: load one workflow the way the template browser does, then report what the frontend made
# of it. Node boxes include the title bar, which litegraph draws above node.pos.
_LOAD_AND_INSPECT = """async ([workflow, name]) => {
  const app = window.app, LG = window.LiteGraph;
  await app.loadGraphData(workflow, true, true, name);
  const canvas = app.canvas;
  const titleHeight = LG.NODE_TITLE_HEIGHT;
  const nodes = app.graph._nodes.map((node) => ({
    id: node.id, type: node.type, title: node.title,
    registered: Boolean(LG.registered_node_types[node.type]), hasErrors: Boolean(node.has_errors),
    box: [node.pos[0], node.pos[1] - titleHeight, node.size[0], node.size[1] + titleHeight],
    size: Array.from(node.size), minSize: Array.from(node.computeSize()),
    widgets: (node.widgets || []).map((w) => ({name: w.name, value: w.value,
                                                serialize: !(w.options && w.options.serialize === false)})),
  }));
  const groups = app.graph._groups.map((g) => ({title: g.title, box: Array.from(g._bounding || g.bounding),
                                                titleHeight: g.titleHeight ?? LG.NODE_TITLE_HEIGHT}));
  const prompt = await app.graphToPrompt();
  return {nodes, groups, output: prompt.output, scale: canvas.ds.scale,
          dialogs: Array.from(document.querySelectorAll('.p-dialog')).map((d) => d.innerText.slice(0, 300))};
}"""

# Runs in the page: fit the whole graph (nodes and groups) into the viewport with a margin and redraw.
_FIT_VIEW = """async (margin) => {
  const app = window.app, LG = window.LiteGraph, canvas = app.canvas;
  const boxes = app.graph._nodes.map((n) => [n.pos[0], n.pos[1] - LG.NODE_TITLE_HEIGHT,
                                             n.size[0], n.size[1] + LG.NODE_TITLE_HEIGHT]);
  for (const g of app.graph._groups) boxes.push(Array.from(g._bounding || g.bounding));
  const x0 = Math.min(...boxes.map((b) => b[0])), y0 = Math.min(...boxes.map((b) => b[1]));
  const x1 = Math.max(...boxes.map((b) => b[0] + b[2])), y1 = Math.max(...boxes.map((b) => b[1] + b[3]));
  const el = canvas.canvas, width = el.clientWidth, height = el.clientHeight;
  const scale = Math.min((width - 2 * margin) / (x1 - x0), (height - 2 * margin) / (y1 - y0));
  canvas.ds.scale = scale;
  canvas.ds.offset[0] = (width / scale - (x1 - x0)) / 2 - x0;
  canvas.ds.offset[1] = (height / scale - (y1 - y0)) / 2 - y0;
  canvas.setDirty(true, true);
  canvas.draw(true, true);
  await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
  return scale;
}"""


class Frontend:
    """One browser page on a running server's frontend."""

    def __init__(self, page) -> None:
        self.page = page

    def inspect(self, workflow: dict, name: str) -> dict[str, Any]:
        """Load `workflow` into the page; the frontend's nodes, widgets, groups and graphToPrompt output."""
        return self.page.evaluate(_LOAD_AND_INSPECT, [workflow, name])

    def fit_view(self, margin: int = 24) -> float:
        return self.page.evaluate(_FIT_VIEW, margin)

    def focus_mode(self) -> None:
        """Hide the menus and side bars (the frontend's own focus mode), leaving the canvas."""
        self.page.evaluate("() => window.app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
        self.page.wait_for_timeout(300)

    def version(self) -> str:
        return self.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || ''")


@contextlib.contextmanager
def open_frontend(url: str, width: int = 1280, height: int = 720) -> Iterator[Frontend]:
    """Headless Chromium with a fresh profile on `url`, once the frontend's app and graph exist."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="perres-chromium-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": width, "height": height})
            try:
                page = context.new_page()
                page.goto(url)
                page.wait_for_function("() => window.app && window.app.graph && window.app.canvas "
                                       "&& window.LiteGraph && window.app.extensionManager", timeout=APP_TIMEOUT_MS)
                yield Frontend(page)
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
