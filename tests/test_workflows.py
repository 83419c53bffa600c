"""The example workflows: UI and API twins agree with each other and with the node definitions, and
every API workflow runs through ComfyUI's real executor on the random SD1.5 checkpoint.

The UI files are checked the way the frontend reads them: widgets_values are matched to the node's
widget inputs in /object_info order (an INT with control_after_generate, or named seed/noise_seed,
carries one extra value), links must be referenced from both ends with matching types, and the
result, converted to API form, must equal the API twin exactly.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid

import pytest
import torch

from conftest import pack, prompt_executor, run_node
from workflow_runs import (DIT_WORKFLOWS, TEST_RESOLUTION, TEST_SNAPSHOT_EVERY, TEST_STEPS, failure_report,
                           for_tests, host_lacks_family)

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UI_DIR = os.path.join(PACK_DIR, "example_workflows")
API_DIR = os.path.join(UI_DIR, "api")

EXPECTED = {"perres_train_and_sample", "perres_load_and_apply", "perres_lag_sampling", "perres_normal_vs_lag",
            "perres_two_concepts_lag", "perres_lag_lora", "perres_train_with_masks",
            "perres_continue_training", "perres_suggest_class_word", "perres_sdxl_train_and_sample",
            "perres_sdxl_lag_sampling", "perres_sdxl_lag_lora", "perres_compare_snapshots",
            "perres_anima_train_and_sample", "perres_krea2_train_and_sample", "perres_anima_lag_lora",
            "perres_krea2_lag_lora"}
# Workflows for SDXL-family checkpoints: they run on the random SDXL checkpoint (UNet in bf16).
SDXL_WORKFLOWS = {"perres_sdxl_train_and_sample", "perres_sdxl_lag_sampling", "perres_sdxl_lag_lora"}
# run through the executor on every host (the smallest SD1.x training, LAG and LAG LoRA); the rest on the newest
EVERY_HOST_RUNS = {"perres_train_and_sample", "perres_lag_sampling", "perres_lag_lora"}
# At the tests' 64 px the trainer rightly warns that SDXL is trained at 1024 px.
SDXL_TEST_WARNING = "training SDXL at 64 px"
# Frontend-only nodes (comments on the canvas): in UI files, never in API files.
VIRTUAL_TYPES = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# Combos whose options are the files installed on the user's machine.
FILE_COMBOS = {"ckpt_name", "residual_name", "lora_name", "unet_name", "clip_name", "vae_name"}
# Residual files the workflows load -> (identifier, class word) of the stand-in the tests train.
RESIDUALS = {
    "perres/robot_00001.safetensors": ("sks", "toy"),
    "perres/dog_00001.safetensors": ("sks", "dog"),
    "perres/cat_00001.safetensors": ("olis", "cat"),
}
SDXL_RESIDUALS = {"perres/robot_sdxl_00001.safetensors": ("sks", "toy")}


def names_in(folder: str) -> set[str]:
    return {n[:-5] for n in os.listdir(folder) if n.endswith(".json")}


def load(folder: str, name: str) -> dict:
    with open(os.path.join(folder, name + ".json"), encoding="utf-8") as handle:
        return json.load(handle)


WORKFLOWS = sorted(names_in(UI_DIR) | names_in(API_DIR))


# --------------------------------------------------------------------------------------------------
# Node definitions as /object_info reports them
# --------------------------------------------------------------------------------------------------
def node_info(class_type: str) -> dict:
    import nodes
    from comfy_api.internal import _ComfyNodeInternal

    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    if issubclass(cls, _ComfyNodeInternal):
        return cls.GET_NODE_INFO_V1()
    inputs = cls.INPUT_TYPES()
    return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
            "output": list(cls.RETURN_TYPES), "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "output_node": getattr(cls, "OUTPUT_NODE", False) is True}


def visible_inputs(info: dict) -> list[tuple[str, list]]:
    result = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        result += [(name, list(specs[name])) for name in info["input_order"].get(section, list(specs))]
    return result


def options_of(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def type_of(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def is_widget(spec: list) -> bool:
    return type_of(spec) in WIDGET_TYPES and not options_of(spec).get("forceInput", False)


def has_control_widget(name: str, spec: list) -> bool:
    if type_of(spec) != "INT":
        return False
    flag = options_of(spec).get("control_after_generate")
    return bool(flag) if flag is not None else name in ("seed", "noise_seed")


def check_widget_value(where: str, name: str, spec: list, value) -> None:
    options = options_of(spec)
    kind = type_of(spec)
    if kind == "COMBO":
        choices = spec[0] if isinstance(spec[0], list) else options.get("options", [])
        if name not in FILE_COMBOS:
            assert value in choices, f"{where}: {name}={value!r} is not one of {choices}"
        else:
            assert isinstance(value, str) and value, f"{where}: {name} must name a file"
    elif kind in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {name}={value!r}"
        if kind == "INT":
            assert isinstance(value, int), f"{where}: {name}={value!r} is not an integer"
        if "min" in options:
            assert value >= options["min"], f"{where}: {name}={value} < min {options['min']}"
        if "max" in options:
            assert value <= options["max"], f"{where}: {name}={value} > max {options['max']}"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {name}={value!r} is not a string"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {name}={value!r} is not a boolean"


def ui_to_api(workflow: dict) -> dict:
    """What the frontend sends for a UI workflow (its graphToPrompt), for mode-0 nodes."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_TYPES:
            continue
        where = f"node {node['id']} ({node['type']})"
        assert node.get("mode", 0) == 0, f"{where}: muted or bypassed nodes are not expected in examples"
        info = node_info(node["type"])
        values = list(node.get("widgets_values", []))
        linked = {entry["name"]: links[entry["link"]] for entry in node.get("inputs", [])
                  if entry.get("link") is not None}
        inputs = {}
        for name, spec in visible_inputs(info):
            if is_widget(spec):
                assert values, f"{where}: widgets_values ends before widget '{name}'"
                value = values.pop(0)
                check_widget_value(where, name, spec, value)
                if has_control_widget(name, spec):
                    assert values and values[0] in CONTROL_VALUES, \
                        f"{where}: '{name}' needs a control_after_generate value after it, got {values[:1]}"
                    values.pop(0)
                inputs[name] = value
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
        assert not values, f"{where}: {len(values)} widgets_values left over: {values}"
        unknown = set(linked) - {name for name, _ in visible_inputs(info)}
        assert not unknown, f"{where}: links into unknown inputs {unknown}"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


# --------------------------------------------------------------------------------------------------
# (i) the files agree with each other and with the node definitions
# --------------------------------------------------------------------------------------------------
@pytest.mark.every_host  # the frontend's workflow format and the host's node inputs
def test_every_workflow_has_both_formats():
    ui, api = names_in(UI_DIR), names_in(API_DIR)
    assert ui == api, f"UI without API twin: {sorted(ui - api)}; API without UI twin: {sorted(api - ui)}"
    assert EXPECTED <= ui, f"missing example workflows: {sorted(EXPECTED - ui)}"


@pytest.mark.every_host  # the frontend's workflow format and the host's node inputs
@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_is_well_formed(name, host_root):
    import nodes

    if host_lacks_family(name, host_root):
        pytest.skip(f"this ComfyUI has no {DIT_WORKFLOWS[name]} (added after 0.3.64)")

    workflow = load(UI_DIR, name)
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        assert key in workflow, f"{name}: top-level '{key}' missing"
    assert workflow["version"] == 0.4
    by_id = {node["id"]: node for node in workflow["nodes"]}
    assert len(by_id) == len(workflow["nodes"]), f"{name}: duplicate node ids"
    assert workflow["last_node_id"] >= max(by_id)
    link_ids = [link[0] for link in workflow["links"]]
    assert len(set(link_ids)) == len(link_ids), f"{name}: duplicate link ids"
    assert workflow["last_link_id"] >= max(link_ids, default=0)
    orders = sorted(node["order"] for node in workflow["nodes"])
    assert orders == list(range(len(by_id))), f"{name}: node 'order' is not a permutation"

    infos = {}
    for node in workflow["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "properties"):
            assert key in node, f"{name}: node {node.get('id')} lacks '{key}'"
        if node["type"] in VIRTUAL_TYPES:
            assert not node.get("inputs") and not node.get("outputs")
            continue
        assert node["type"] in nodes.NODE_CLASS_MAPPINGS, f"{name}: unknown node type {node['type']}"
        infos[node["id"]] = node_info(node["type"])

    for link_id, src, src_slot, dst, dst_slot, link_type in workflow["links"]:
        where = f"{name}: link {link_id} ({src}:{src_slot} -> {dst}:{dst_slot})"
        assert src in infos and dst in infos, f"{where}: joins a missing or virtual node"
        output = by_id[src]["outputs"][src_slot]
        assert link_id in output["links"], f"{where}: not listed in the source output's links"
        assert output["type"] == link_type == infos[src]["output"][src_slot], f"{where}: output type mismatch"
        entry = by_id[dst]["inputs"][dst_slot]
        assert entry["link"] == link_id, f"{where}: the target input does not reference it"
        spec = dict(visible_inputs(infos[dst]))[entry["name"]]
        assert entry["type"] == type_of(spec), f"{where}: input type {entry['type']} != {type_of(spec)}"
        assert link_type == type_of(spec) or type_of(spec) == "*", f"{where}: carries {link_type} into {spec[0]}"

    referenced = {entry["link"] for node in workflow["nodes"] for entry in node.get("inputs", [])
                  if entry.get("link") is not None}
    referenced |= {i for node in workflow["nodes"] for out in node.get("outputs", []) for i in out.get("links") or []}
    assert referenced == set(link_ids), f"{name}: nodes reference links {sorted(referenced ^ set(link_ids))} " \
                                        "that the links list lacks (or the reverse)"
    for node_id, info in infos.items():
        node = by_id[node_id]
        # Newer hosts may append outputs to a stock node (SaveImage passes its IMAGE on in 0.33.0); the
        # frontend adds them when it loads the file. The saved ones must be the host's first outputs, and
        # the pack's own nodes must list exactly theirs.
        saved, host_outputs = [o["type"] for o in node["outputs"]], list(info["output"])
        expected = host_outputs if node["type"].startswith("PerRes") else host_outputs[:len(saved)]
        assert saved == expected, f"{name}: outputs of node {node_id}: {saved} != {host_outputs}"
        required = {n for n, s in visible_inputs(info) if not is_widget(s) and n in info["input"].get("required", {})}
        connected = {e["name"] for e in node.get("inputs", []) if e.get("link") is not None}
        assert required <= connected, f"{name}: node {node_id} ({node['type']}) has unconnected {required - connected}"


@pytest.mark.every_host  # the frontend's workflow format and the host's node inputs
@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_widgets_equal_api_twin(name, host_root):
    if host_lacks_family(name, host_root):
        pytest.skip(f"this ComfyUI has no {DIT_WORKFLOWS[name]} (added after 0.3.64)")
    converted = ui_to_api(load(UI_DIR, name))
    api = load(API_DIR, name)
    for node_id, node in api.items():  # the frontend's API schema requires a title
        assert isinstance(node.get("_meta", {}).get("title"), str), f"{name}: API node {node_id} lacks _meta.title"
    literal = {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]} for node_id, node in api.items()}
    assert converted.keys() == literal.keys(), f"{name}: node ids differ"
    for node_id in literal:
        assert converted[node_id] == literal[node_id], f"{name}: node {node_id} differs between UI and API files"


def read_readme() -> str:
    with open(os.path.join(PACK_DIR, "README.md"), encoding="utf-8") as handle:
        return handle.read()


def test_readme_lists_every_workflow():
    readme = read_readme()
    for name in WORKFLOWS:
        assert f"{name}.json" in readme, f"README.md does not mention {name}.json"


def test_node_reference_documents_every_node_input(host_root):
    """The node reference (docs/nodes.md, linked from the README) names every PerRes node, and every input and
    output of it in a table row."""
    import nodes

    with open(os.path.join(PACK_DIR, "docs", "nodes.md"), encoding="utf-8") as handle:
        reference = handle.read()
    pack_nodes = sorted(n for n in nodes.NODE_CLASS_MAPPINGS if n.startswith("PerRes"))
    assert len(pack_nodes) >= 8
    for class_type in pack_nodes:
        heading = f"(`{class_type}`)\n"
        assert heading in reference, f"docs/nodes.md lacks {class_type}"
        section = reference[reference.index(heading):]
        section = section[:section.index("\n## ")] if "\n## " in section else section
        info = node_info(class_type)
        for name, _ in visible_inputs(info):
            assert f"| `{name}`" in section, f"docs/nodes.md: {class_type} input '{name}' is not documented"
        for name in info["output_name"]:
            assert f"| `{name}` |" in section, f"docs/nodes.md: {class_type} output '{name}' is not documented"


# --------------------------------------------------------------------------------------------------
# (ii) every API workflow runs through ComfyUI's executor
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded_checkpoints(sd15, checkpoint_name) -> dict[str, tuple]:
    """Checkpoints already loaded by fixtures, by file name; the SDXL one is added by the first SDXL workflow."""
    return {checkpoint_name: tuple(sd15)}


@pytest.fixture(scope="module")
def executor(loaded_checkpoints):
    """One PromptExecutor for every run. Its Load Checkpoint node hands out the checkpoints the fixtures
    already loaded (the `sd15` and `sdxl` fixtures) instead of reading the files a second time."""
    import nodes

    loader = nodes.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]
    original = loader.load_checkpoint

    def load_checkpoint(self, ckpt_name):
        return loaded_checkpoints[ckpt_name] if ckpt_name in loaded_checkpoints else original(self, ckpt_name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loader, "load_checkpoint", load_checkpoint)
        yield prompt_executor()


@pytest.fixture(scope="module")
def residual_files(sd15, concept_images) -> dict[str, str]:
    """Stand-ins for the residual files the workflows load: trained once (1 step at 64 px), then saved
    under each concept's identifier and class word, so LAG finds the concept words of every prompt."""
    model, clip, vae = sd15
    residuals = run_node("PerResTrainResiduals", model=model, clip=clip, vae=vae, images=concept_images,
                         identifier="sks", class_word="toy", steps=1, batch_size=4, learning_rate=1e-3,
                         rank_ratio=0.05, resolution=TEST_RESOLUTION, seed=0, init="random")[1]
    concept_info = type(residuals.concept)
    saved = {}
    for name, (identifier, class_word) in sorted(RESIDUALS.items()):
        renamed = residuals.with_concept(concept_info(identifier, class_word))
        (filename,) = run_node("PerResSaveResiduals", residuals=renamed, filename_prefix=f"workflow_tests/{class_word}")
        saved[name] = filename
    return saved


@pytest.fixture(scope="module")
def sdxl_residual_files() -> dict[str, str]:
    """Stand-ins for the SDXL residual files the SDXL workflows load: untrained (random init) SDXL residuals,
    saved by the Save node under each concept's words; no SDXL model is needed to make them."""
    residual = pack("perres_core.residual")
    saved = {}
    for name, (identifier, class_word) in sorted(SDXL_RESIDUALS.items()):
        residuals = residual.ResidualSet.for_family(pack("perres_core.families").SDXL,
                                                    concept=residual.ConceptInfo(identifier, class_word))
        with torch.inference_mode(False):
            residuals.initialize("random", 0)
        (filename,) = run_node("PerResSaveResiduals", residuals=residuals,
                               filename_prefix=f"workflow_tests/sdxl_{class_word}")
        saved[name] = filename
    return saved


def write_lora_stand_ins(model, loras: dict, workdir: str) -> None:
    """Random kohya LoRAs of `model`'s family under the names the workflows load (tests/lora_files)."""
    from lora_files import build_lora, write_lora

    for name, (seed, _words) in loras.items():
        write_lora(os.path.join(workdir, "models", "loras"), name, build_lora(model, "kohya", seed=seed))


@pytest.fixture(scope="module")
def lora_stand_ins(sd15, workdir) -> None:
    from lora_files import EXAMPLE_LORAS

    write_lora_stand_ins(sd15[0], EXAMPLE_LORAS, workdir)


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.sdxl) if name in SDXL_WORKFLOWS
                                  else pytest.param(name, marks=pytest.mark.every_host) if name in EVERY_HOST_RUNS
                                  else name for name in WORKFLOWS])
def test_api_workflow_runs(name, executor, checkpoint_name, residual_files, lora_stand_ins, loaded_checkpoints,
                           workdir, caplog, request):
    import execution

    if name in SDXL_WORKFLOWS:
        from lora_files import SDXL_EXAMPLE_LORAS

        checkpoint_name = request.getfixturevalue("sdxl_checkpoint_name")
        loaded_checkpoints.setdefault(checkpoint_name, tuple(request.getfixturevalue("sdxl")))
        write_lora_stand_ins(loaded_checkpoints[checkpoint_name][0], SDXL_EXAMPLE_LORAS, workdir)
        residual_files = {**residual_files, **request.getfixturevalue("sdxl_residual_files")}
    if name in DIT_WORKFLOWS:
        pytest.skip("runs on its DiT in a process of its own (tests/test_host_dit_models.py, test_host_dit_lag.py)")
    prompt = for_tests(name, load(API_DIR, name), {"ckpt_name": checkpoint_name}, residual_files)
    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    assert valid, f"{name}: ComfyUI rejects the prompt: {error} {json.dumps(node_errors, default=str)[:2000]}"
    expected_outputs = {node_id for node_id, node in prompt.items() if node_info(node["class_type"])["output_node"]}
    assert set(outputs) == expected_outputs, f"{name}: ComfyUI would skip output nodes"

    with caplog.at_level(logging.WARNING, logger="perres"):
        executor.execute(prompt, prompt_id, {}, outputs)
    events = [event for event, _ in executor.status_messages]
    assert executor.success and "execution_success" in events, f"{name} failed:\n{failure_report(executor)}"
    # the example prompts contain their concepts' words, and the identifiers are single CLIP tokens
    warnings = [r.getMessage() for r in caplog.records if r.name == "perres" and r.levelno >= logging.WARNING
                and not (name in SDXL_WORKFLOWS and SDXL_TEST_WARNING in r.getMessage())]
    assert not warnings, f"{name}: PerRes warned: {warnings}"

    results = executor.history_result["outputs"]
    output_dir = os.path.join(workdir, "output")
    for node_id, node in prompt.items():
        kind = node["class_type"]
        if kind == "SaveImage":
            images = results.get(node_id, {}).get("images", [])
            assert images, f"{name}: SaveImage {node_id} saved nothing"
            for image in images:
                path = os.path.join(output_dir, image["subfolder"], image["filename"])
                assert image["type"] == "output" and os.path.isfile(path), f"{name}: {path} was not written"
        elif kind == "PerResSaveResiduals":
            text = results.get(node_id, {}).get("text", [])
            assert text and text[0].startswith("saved models/loras/"), f"{name}: residuals not saved: {text}"
            saved = os.path.join(workdir, "models", "loras", text[0][len("saved models/loras/"):])
            assert os.path.isfile(saved), f"{name}: {saved} missing"
        elif kind in ("PerResLAGMaskPreview", "LossGraphNode", "PreviewImage"):
            assert results.get(node_id, {}).get("images"), f"{name}: {kind} {node_id} shows no image"
    if name == "perres_normal_vs_lag":  # the two samples, stitched side by side with a gap, in one image
        from PIL import Image

        save = next(i for i, n in prompt.items() if n["class_type"] == "SaveImage")
        stitch = next(n["inputs"] for n in prompt.values() if n["class_type"] == "ImageStitch")
        saved = results[save]["images"]
        assert len(saved) == 1
        with Image.open(os.path.join(output_dir, saved[0]["subfolder"], saved[0]["filename"])) as image:
            assert image.size == (2 * TEST_RESOLUTION + stitch["spacing_width"], TEST_RESOLUTION)
    if name == "perres_compare_snapshots":
        check_snapshot_fan_out(name, prompt, results, workdir)


def check_snapshot_fan_out(name: str, prompt: dict, results: dict, workdir: str) -> None:
    """The trainer wrote a snapshot every step, and its `snapshots` list ran Apply → KSampler → VAE Decode →
    Save Image once per snapshot, with the one seed of the single KSampler: one image per snapshot."""
    from PIL import Image

    residual_file = pack("perres_core.residual_file")
    (train,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "PerResTrainResiduals"]
    assert train["steps"] == TEST_STEPS and train["snapshot_every"] == TEST_SNAPSHOT_EVERY
    snapshots = TEST_STEPS // TEST_SNAPSHOT_EVERY
    # the snapshot files, under the test's models/loras, one per step, each recording its step
    folder, base = os.path.split(os.path.join(workdir, "models", "loras", *train["snapshot_prefix"].split("/")))
    written = sorted(f for f in (os.listdir(folder) if os.path.isdir(folder) else []) if f.startswith(base + "_step"))
    assert written == [f"{base}_step{step:05d}_00001.safetensors" for step in range(1, snapshots + 1)], \
        f"{name}: snapshot files {written} in {folder}"
    for step, filename in enumerate(written, start=1):
        metadata = residual_file.read_header(os.path.join(folder, filename))["__metadata__"]
        assert metadata[residual_file.META_PREFIX + "steps"] == str(step), f"{name}: {filename}: {metadata}"
    # the list fans out: Apply takes the `snapshots` output (slot 3), and one sampler with a literal seed
    (apply,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "PerResApplyResiduals"]
    train_id = next(i for i, n in prompt.items() if n["class_type"] == "PerResTrainResiduals")
    assert apply["residuals"] == [train_id, 3], f"{name}: Apply is not fed by the snapshots output"
    (sampler,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "KSampler"]
    assert isinstance(sampler["seed"], int), f"{name}: the sampler's seed must be one fixed value"
    ui_sampler = next(n for n in load(UI_DIR, name)["nodes"] if n["type"] == "KSampler")
    assert ui_sampler["widgets_values"][1] == "fixed", f"{name}: control after generate must be fixed"
    (save,) = [i for i, n in prompt.items() if n["class_type"] == "SaveImage"]
    images = results[save]["images"]
    assert len(images) == snapshots, f"{name}: {len(images)} images for {snapshots} snapshots: {images}"
    assert len({image["filename"] for image in images}) == snapshots, f"{name}: images overwrote each other"
    for image in images:
        with Image.open(os.path.join(workdir, "output", image["subfolder"], image["filename"])) as picture:
            assert picture.size == (TEST_RESOLUTION, TEST_RESOLUTION)
