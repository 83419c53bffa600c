"""Every example workflow opened in the real ComfyUI frontend, in headless Chromium.

One server (tests/comfy_server.py) and one browser page serve all workflows. Each workflow is loaded with
the frontend's own app.loadGraphData, and the test asserts what a user would see and send:
  * no node type is missing (every type is registered with LiteGraph and no node is flagged);
  * every widget, read by name from the live node, holds the value meant for that input (the API twin);
  * the prompt the frontend builds (app.graphToPrompt) equals the API twin in example_workflows/api/;
  * no node overlaps another, no node is smaller than the frontend's minimum size for its widgets, and
    no node sticks half out of a group or under its title bar;
  * the template browser's thumbnail, GET /api/workflow_templates/<pack>/<name>.jpg, is a JPEG.

Chromium and playwright are required: without them these tests fail with how to install them
(.ci/install-browser); they never skip.
"""
from __future__ import annotations

import copy
import io
import itertools
import shutil
import tempfile

import pytest

from comfy_server import prepare_root, running_server
from frontend import example_names, load_example, missing_browser, open_frontend, prepare_frontend_root

pytestmark = pytest.mark.every_host  # the frontend package differs between hosts

VIRTUAL_TYPES = {"Note", "MarkdownNote"}  # frontend-only nodes: in the UI file, never in the prompt
WORKFLOWS = example_names()
THUMBNAIL_SIZE = (1280, 720)
THUMBNAIL_MAX_BYTES = 300_000


def require_browser() -> None:
    problem = missing_browser()
    if problem:
        pytest.fail(f"the UI tests need a browser: {problem}", pytrace=False)


@pytest.fixture(scope="module")
def server(host_root):
    require_browser()
    root = tempfile.mkdtemp(prefix="perres-ui-")
    try:
        config, pack_folder = prepare_root(root, host_root)
        prepare_frontend_root(root)
        with running_server(host_root, root, config, pack_folder) as instance:
            yield instance
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def frontend(server):
    with open_frontend(server.url) as page:
        yield page


@pytest.fixture(scope="module")
def inspected(frontend) -> dict[str, dict]:
    """What the frontend made of each example workflow, loaded once each."""
    return {name: frontend.inspect(load_example(name), name) for name in WORKFLOWS}


# --------------------------------------------------------------------------------------------------
# The checks, as functions that list problems, so that test_checks_catch_a_broken_workflow can show
# that each of them fails on a bad graph.
# --------------------------------------------------------------------------------------------------
def missing_types(state: dict) -> list[str]:
    return [f"node {n['id']}: type {n['type']!r} is unknown to the frontend" for n in state["nodes"]
            if not n["registered"] or n["hasErrors"]]


def misplaced_widgets(state: dict, workflow: dict, api: dict) -> list[str]:
    """Widgets whose live value differs from the value meant for their input: the API twin's literal
    inputs, or the text of a note."""
    saved = {str(node["id"]): node for node in workflow["nodes"]}  # newer frontends use string ids
    problems = []
    for node in state["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        live = {w["name"]: w["value"] for w in node["widgets"] if w["serialize"]}
        linked: set[str] = set()
        if node["type"] in VIRTUAL_TYPES:
            expected = {"text": saved[str(node["id"])]["widgets_values"][0]}
        else:
            inputs = api[str(node["id"])]["inputs"]
            expected = {key: value for key, value in inputs.items() if not isinstance(value, list)}
            linked = {key for key, value in inputs.items() if isinstance(value, list)}  # a link feeds these
        for name, value in expected.items():
            if name not in live:
                problems.append(f"{where}: no widget '{name}' (widgets: {sorted(live)})")
            elif live[name] != value:
                problems.append(f"{where}: widget '{name}' shows {live[name]!r}, meant {value!r}")
        for name in sorted(set(live) - set(expected) - linked):
            problems.append(f"{where}: widget '{name}'={live[name]!r} is not in the API twin")
    return problems


def prompt_differences(state: dict, workflow: dict, api: dict) -> list[str]:
    """graphToPrompt against the API twin. `_meta.title` is compared only where the workflow sets a title:
    elsewhere it is the host's display name, which changes between ComfyUI versions."""
    titled = {str(node["id"]) for node in workflow["nodes"] if node.get("title")}
    output = {i: {**node, "_meta": node["_meta"] if i in titled else None} for i, node in state["output"].items()}
    api = {i: {**node, "_meta": node["_meta"] if i in titled else None} for i, node in api.items()}
    problems = [f"node {i}: only in graphToPrompt" for i in sorted(set(output) - set(api))]
    problems += [f"node {i}: only in the API twin" for i in sorted(set(api) - set(output))]
    for node_id in sorted(set(output) & set(api)):
        if output[node_id] != api[node_id]:
            problems.append(f"node {node_id}: graphToPrompt {output[node_id]} != API twin {api[node_id]}")
    return problems


def _overlap(a: list[float], b: list[float]) -> float:
    """Area shared by two [x, y, width, height] boxes."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(width, 0) * max(height, 0)


def layout_problems(state: dict) -> list[str]:
    nodes, problems = state["nodes"], []
    for a, b in itertools.combinations(nodes, 2):
        if _overlap(a["box"], b["box"]) > 0:
            problems.append(f"node {a['id']} ({a['title']}) {a['box']} overlaps "
                            f"node {b['id']} ({b['title']}) {b['box']}")
    for node in nodes:
        if node["size"][0] < node["minSize"][0] or node["size"][1] < node["minSize"][1]:
            problems.append(f"node {node['id']} ({node['title']}): size {node['size']} is below the frontend's "
                            f"minimum {node['minSize']}, its widgets spill out")
    for group in state["groups"]:
        x, y, width, height = group["box"]
        title_bar = [x, y, width, group["titleHeight"]]
        for node in nodes:
            shared = _overlap(group["box"], node["box"])
            inside = shared >= node["box"][2] * node["box"][3] - 1e-6
            if 0 < shared and not inside:
                problems.append(f"node {node['id']} ({node['title']}) sticks half out of group '{group['title']}'")
            if _overlap(title_bar, node["box"]) > 0:
                problems.append(f"node {node['id']} ({node['title']}) covers the title of group '{group['title']}'")
    return problems


# --------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------
def test_browser_is_installed():
    assert missing_browser() is None, missing_browser()


def test_frontend_is_the_hosts_package(frontend):
    import importlib.metadata

    assert frontend.version() == importlib.metadata.version("comfyui-frontend-package")


@pytest.mark.parametrize("name", WORKFLOWS)
def test_no_missing_node_types(name, inspected):
    state = inspected[name]
    assert [n["id"] for n in state["nodes"]] and not missing_types(state), missing_types(state)
    assert len(state["nodes"]) == len(load_example(name)["nodes"]), f"{name}: the frontend dropped nodes"
    assert not state["dialogs"], f"{name}: the frontend opened dialogs: {state['dialogs']}"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_widget_values_land_on_their_inputs(name, inspected):
    problems = misplaced_widgets(inspected[name], load_example(name), load_example(name, api=True))
    assert not problems, f"{name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_graph_to_prompt_equals_api_twin(name, inspected):
    problems = prompt_differences(inspected[name], load_example(name), load_example(name, api=True))
    assert not problems, f"{name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_layout_has_no_overlaps(name, inspected):
    problems = layout_problems(inspected[name])
    assert not problems, f"{name} (tools/make_workflows.py lays it out):\n" + "\n".join(problems)


def test_checks_catch_a_broken_workflow(frontend):
    """A graph with an unknown node type, two widget values swapped and one node moved onto another."""
    name = "perres_lag_sampling"
    workflow, api = copy.deepcopy(load_example(name)), load_example(name, api=True)
    by_type = {node["type"]: node for node in workflow["nodes"]}
    latent = by_type["EmptyLatentImage"]
    latent["widgets_values"][0], latent["widgets_values"][2] = latent["widgets_values"][2], latent["widgets_values"][0]
    by_type["PerResLoadResiduals"]["pos"] = list(by_type["CheckpointLoaderSimple"]["pos"])
    by_type["VAEDecode"]["type"] = "PerResNoSuchNode"
    state = frontend.inspect(workflow, "broken")
    assert any("PerResNoSuchNode" in p for p in missing_types(state)), missing_types(state)
    assert any("'width' shows 1" in p for p in misplaced_widgets(state, workflow, api))
    assert prompt_differences(state, workflow, api)
    assert any("overlaps" in p for p in layout_problems(state))


@pytest.mark.parametrize("name", WORKFLOWS)
def test_template_thumbnail_is_served(name, server):
    from PIL import Image

    status, listing = server.request("GET", "/workflow_templates")
    assert status == 200 and name in listing.get(server.pack_folder, []), listing
    status, body, content_type = server.fetch("GET", f"/api/workflow_templates/{server.pack_folder}/{name}.jpg")
    assert status == 200, f"no thumbnail example_workflows/{name}.jpg: run tools/make_thumbnails.py"
    assert content_type == "image/jpeg" and len(body) < THUMBNAIL_MAX_BYTES, (content_type, len(body))
    with Image.open(io.BytesIO(body)) as image:
        assert image.format == "JPEG" and image.size == THUMBNAIL_SIZE, (image.format, image.size)
