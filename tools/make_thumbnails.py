"""Make the template browser's thumbnails, example_workflows/<name>.jpg, from the real frontend.

    ~/ComfyUI/.venv/bin/python tools/make_thumbnails.py [--comfyui ~/ComfyUI] [NAME ...]

Starts `main.py --cpu` with the pack (tests/comfy_server.py), opens the frontend it serves in headless
Chromium (tests/frontend.py; install it with .ci/install-browser), loads each example workflow with the
frontend's own loadGraphData, hides the menus, fits the graph to the view and screenshots it. The frontend
asks for `/api/workflow_templates/<pack folder>/<name>.jpg`, and the README shows the same pictures.

The page is rendered at 1920x1080 and scaled down to 1280x720: at the zoom a whole graph needs in
1280x720, litegraph would switch to its low-quality mode and draw no text.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import sys
import tempfile
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RENDER_SIZE = (1920, 1080)
THUMBNAIL_SIZE = (1280, 720)  # tests/test_ui.py checks this size
JPEG_QUALITY = 85
log = logging.getLogger("perres.make_thumbnails")


def to_jpeg(png: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        small = image.convert("RGB").resize(THUMBNAIL_SIZE, Image.LANCZOS)
    out = io.BytesIO()
    small.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True, progressive=True)
    return out.getvalue()


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", help="ComfyUI root (default: $COMFYUI_PATH, the enclosing ComfyUI, ~/ComfyUI)")
    parser.add_argument("names", nargs="*", help="only these workflows, e.g. perres_train_and_sample (default: all)")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tests' helper modules, never the pack root
    from comfy_host import find_comfyui, start_host
    from comfy_server import prepare_root, running_server
    from frontend import EXAMPLES_DIR, example_names, load_example, missing_browser, open_frontend, \
        prepare_frontend_root

    problem = missing_browser()
    if problem:
        parser.error(problem)
    unknown = sorted(set(args.names) - set(example_names()))
    if unknown:
        parser.error(f"no example workflow named {', '.join(unknown)}")
    comfy_root = args.comfyui or find_comfyui()
    if not comfy_root:
        parser.error("ComfyUI not found; pass --comfyui or set COMFYUI_PATH")
    comfy_root = os.path.abspath(os.path.expanduser(comfy_root))
    # in-process host: the placeholder residual files are written by the pack's own code
    start_host(comfy_root, tempfile.mkdtemp(prefix="perres-thumbnails-host-"))
    root = tempfile.mkdtemp(prefix="perres-thumbnails-")
    try:
        config, pack_folder = prepare_root(root, comfy_root)
        prepare_frontend_root(root)
        with running_server(comfy_root, root, config, pack_folder) as server, \
                open_frontend(server.url, *RENDER_SIZE) as frontend:
            frontend.focus_mode()
            log.info("frontend %s", frontend.version())
            for name in args.names or example_names():
                frontend.inspect(load_example(name), name)
                scale = frontend.fit_view()
                jpeg = to_jpeg(frontend.page.screenshot(type="png"))
                with open(os.path.join(EXAMPLES_DIR, name + ".jpg"), "wb") as handle:
                    handle.write(jpeg)
                log.info("wrote %s.jpg (zoom %.2f, %d KB)", name, scale, len(jpeg) // 1024)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
