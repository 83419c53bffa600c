"""The node help pages and README's node reference are generated, never hand-kept: the committed files
must equal what tools/make_docs.py makes from the node schemas now. Also: pyproject.toml as the host reads it.
"""
from __future__ import annotations

import importlib.util
import os

import pytest

from comfy_host import PACK_DIR

pytestmark = pytest.mark.every_host  # the schemas as each host registers them

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


def readme_families_table() -> dict[str, dict[str, str]]:
    """README "Install"'s families table: {family: {column: cell}}."""
    with open(os.path.join(PACK_DIR, "README.md"), encoding="utf-8") as handle:
        lines = handle.read().split("## Install", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
    header, body = rows[0], [row for row in rows[2:]]
    return {row[0]: dict(zip(header, row)) for row in body}


# How tests/test_bad_inputs.meta_model names each family's ComfyUI config; a new family needs an entry.
META_MODEL_OF = {"SD1.x": "SD15", "SDXL": "SDXL", "Anima": "Anima", "Krea 2": "Krea2"}


def host_detects(config_name: str) -> bool:
    from test_bad_inputs import meta_model

    try:
        meta_model(config_name)
    except Exception:  # the host has no such model class, or detects its keys as another
        return False
    return True


def lag_accepts(family_name: str, sd15) -> bool:
    """Whether PerRes LAG Sampling takes a model of the family: its family check comes first, so a model it
    accepts reaches the next check (no concept connected) instead of the family refusal."""
    from conftest import pack, run_node
    from test_bad_inputs import meta_model

    model = meta_model(META_MODEL_OF[family_name])
    try:
        run_node("PerResLAGSampling", model=model, clip=sd15[1], prompt="a photo of a sks dog", concept_words="",
                 strength=1.0, threshold="median", quantile=0.5, start_percent=0.0, end_percent=1.0,
                 outside_window="full residual")
    except pack("perres_core.errors").PerResError as exc:
        if "no concept is connected" in str(exc):
            return True
        assert "PerRes supports" in str(exc) or "LAG does not run on" in str(exc), exc
        return False
    raise AssertionError("LAG Sampling ran without a concept")


def test_readme_families_table_matches_the_families_and_the_lag_nodes(sd15):
    from conftest import pack

    families = pack("perres_core.families").FAMILIES
    table = readme_families_table()
    assert list(table) == [family.name for family in families], "README's families table and families.py differ"
    for family in families:
        row = table[family.name]
        assert f"{len(family.layers)} ×" in row["residual layers"], row
        assert f"{family.residual_parameters / 1e6:.2f} M parameters" in row["residual layers"], row
        if family.is_dit and not host_detects(META_MODEL_OF[family.name]):
            continue  # a host older than the family (0.3.64 has no Anima nor Krea 2): nothing to run LAG on
        assert row["LAG"].startswith("yes" if lag_accepts(family.name, sd15) else "no"), (family.name, row["LAG"])


def test_relative_links_in_readme_and_docs_resolve():
    import re

    pages = [os.path.join(PACK_DIR, "README.md")]
    docs = os.path.join(PACK_DIR, "docs")
    pages += [os.path.join(docs, name) for name in sorted(os.listdir(docs)) if name.endswith(".md")]
    for page in pages:
        with open(page, encoding="utf-8") as handle:
            text = handle.read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), target))
            assert os.path.exists(resolved), f"{os.path.relpath(page, PACK_DIR)} links to a missing {target}"
