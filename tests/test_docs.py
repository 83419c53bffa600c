"""The node help pages and the node reference docs/nodes.md are generated, never hand-kept: the committed files
must equal what tools/make_docs.py makes from the node schemas now. The README and docs/ link each other: every
relative link and #anchor resolves and every page is reachable from the README. Also: pyproject.toml as the host
reads it, and the README's families table against the code.
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
    files = tool.render(tool.pack_node_infos())
    committed_pages = {os.path.join(DOCS_DIR, n) for n in os.listdir(DOCS_DIR)}
    assert committed_pages == set(files) - {tool.NODES_PAGE}, "web/docs/ has missing or stale pages"
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


README = os.path.join(PACK_DIR, "README.md")
GUIDE_DIR = os.path.join(PACK_DIR, "docs")


def guide_pages() -> list[str]:
    """README.md and every docs/*.md page."""
    return [README] + [os.path.join(GUIDE_DIR, n) for n in sorted(os.listdir(GUIDE_DIR)) if n.endswith(".md")]


def links(text: str) -> list[tuple[str, str]]:
    """(target, fragment) of every relative Markdown link and <img src> in a page; an empty target is the page
    itself."""
    import re

    found = re.findall(r"\]\(([^)\s]*)\)", text) + re.findall(r"<img [^>]*src=\"([^\"]+)\"", text)
    pairs = [(target.partition("#")[0], target.partition("#")[2]) for target in found]
    return [(path, fragment) for path, fragment in pairs if "://" not in path and not path.startswith("mailto:")]


def anchors(path: str) -> set[str]:
    """The #fragments a Markdown page's headings get (outside code blocks); GitHub numbers a repeated title's
    fragment -1, -2, ..."""
    import re

    tool = make_docs()
    found, counts, fenced = set(), {}, False
    for line in tool.read(path).splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            slug = tool.anchor(line.lstrip("#"))
            counts[slug] = counts.get(slug, -1) + 1
            found.add(f"{slug}-{counts[slug]}" if counts[slug] else slug)
    return found


def test_relative_links_in_readme_and_docs_resolve():
    """Every relative link of README.md and docs/*.md names an existing file and, with #fragment, a heading of
    that Markdown page."""
    tool = make_docs()
    for page in guide_pages():
        for target, fragment in links(tool.read(page)):
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), target)) if target else page
            where = f"{os.path.relpath(page, PACK_DIR)} links to"
            assert os.path.exists(resolved), f"{where} a missing {target}"
            if fragment and resolved.endswith(".md"):
                assert fragment in anchors(resolved), f"{where} {target}#{fragment}, which has no such heading"


def test_every_docs_page_is_reachable_from_the_readme():
    tool = make_docs()
    reached, todo = set(), [README]
    while todo:
        page = todo.pop()
        if page in reached or not os.path.exists(page):
            continue
        reached.add(page)
        todo += [os.path.normpath(os.path.join(os.path.dirname(page), target))
                 for target, _ in links(tool.read(page)) if target.endswith(".md")]
    unreached = [os.path.relpath(page, PACK_DIR) for page in guide_pages() if page not in reached]
    assert not unreached, f"no link leads from README.md to {unreached}"


def test_readme_stays_a_guide():
    """Issue 31: the README is the user's guide; reference and internals live in docs/."""
    with open(README, encoding="utf-8") as handle:
        lines = handle.read().count("\n")
    assert lines <= 420, f"README.md has {lines} lines; move reference text to a page in docs/ and link it"


def test_ci_runs_the_test_command_the_readme_gives():
    """.ci/run runs, in each host's environment, the pytest command the README documents."""
    command = "python -m pytest -q --durations=10 tests"
    with open(README, encoding="utf-8") as handle:
        assert f"`{command}`" in handle.read()
    with open(os.path.join(PACK_DIR, ".ci", "run"), encoding="utf-8") as handle:
        ci = handle.read()
    assert '"$python" -m pytest -q --durations=10 "${selection[@]}" "${pytest_args[@]}"' in ci
    assert "|| pytest_args=(tests)" in ci  # without arguments: the whole tests/ folder
