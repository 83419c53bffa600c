"""The node help pages and README's node reference are generated, never hand-kept: the committed files
must equal what tools/make_docs.py makes from the node schemas now. Also: pyproject.toml as the host reads it.
"""
from __future__ import annotations

import importlib.util
import os

from comfy_host import PACK_DIR

DOCS_DIR = os.path.join(PACK_DIR, "web", "docs")


def make_docs():
    """tools/make_docs.py as a module (loaded from its file: the pack root never goes on sys.path)."""
    path = os.path.join(PACK_DIR, "tools", "make_docs.py")
    spec = importlib.util.spec_from_file_location("perres_make_docs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_pages_and_node_reference_are_up_to_date(host_root):
    tool = make_docs()
    files = tool.render(tool.pack_node_infos(), tool.read(tool.README))
    committed_pages = {os.path.join(DOCS_DIR, n) for n in os.listdir(DOCS_DIR)}
    assert committed_pages == set(files) - {tool.README}, "web/docs/ has missing or stale pages"
    for path, text in files.items():
        assert tool.read(path) == text, (f"{os.path.relpath(path, PACK_DIR)} differs from the node definitions; "
                                         "run tools/make_docs.py")


def test_every_node_has_a_page_with_its_inputs_and_outputs(host_root):
    import nodes

    pack_nodes = sorted(n for n in nodes.NODE_CLASS_MAPPINGS if n.startswith("PerRes"))
    assert len(pack_nodes) >= 8
    for node_id in pack_nodes:
        info = nodes.NODE_CLASS_MAPPINGS[node_id].GET_NODE_INFO_V1()
        with open(os.path.join(DOCS_DIR, f"{node_id}.md"), encoding="utf-8") as handle:
            page = handle.read()
        assert page.count(f"# {info['display_name']}\n") == 1
        for section in ("## When to use", "## Inputs", "## Outputs", "## Example", "## Common errors"):
            assert section in page, f"{node_id}: no '{section}'"
        for name in [*info["input"].get("required", {}), *info["input"].get("optional", {})]:
            assert f"| `{name}`" in page, f"{node_id}: input {name} missing"
        for name in info["output_name"]:
            assert f"| `{name}` |" in page, f"{node_id}: output {name} missing"


def test_pack_registers_its_web_directory(host_root):
    """ComfyUI serves WEB_DIRECTORY at /extensions/<pack folder>/ (the HTTP check is in test_http_api.py)."""
    import nodes

    assert os.path.realpath(DOCS_DIR).startswith(tuple(os.path.realpath(d) for d in nodes.EXTENSION_WEB_DIRS.values()))
    scripts = [n for _, _, files in os.walk(os.path.join(PACK_DIR, "web")) for n in files if n.endswith(".js")]
    assert not scripts, \
        "a .js file under web/ would be loaded into every user's frontend"


def test_pyproject_is_valid_for_the_registry(host_root):
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(PACK_DIR)
    assert config is not None, "pyproject.toml does not parse"
    assert config.project.name == "perres" and config.project.version
    assert config.tool_comfy.publisher_id and config.tool_comfy.display_name == "PerRes"
    for folder in config.tool_comfy.includes:
        assert os.path.isdir(os.path.join(PACK_DIR, folder)), f"[tool.comfy] includes a missing folder {folder}"
