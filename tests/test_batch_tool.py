"""tools/perres_batch.py against two real ComfyUI servers on loopback, one of them killed mid-run.

Three tiny concepts (64 px, 1–2 steps, batch 1) are trained with the random SD1.5 checkpoint. Server A is
killed as soon as it runs a prompt; its concept must then finish on server B. A rerun must skip every
concept and write nothing; a run with no working server must exit non-zero and name what is missing.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from PIL import Image

from comfy_host import PACK_DIR
from comfy_server import LOOPBACK_ENV, launch, prepare_root
from conftest import pack

pytestmark = pytest.mark.slow
TOOL = os.path.join(PACK_DIR, "tools", "perres_batch.py")
TOOL_TIMEOUT_S = 300
TINY = {"resolution": 64, "batch_size": 1, "gradient_checkpointing": False}
# name → concept.json (None: no file; the words and settings come from --set)
CONCEPTS = {
    "dog": {"identifier": "sks", "class_word": "dog", "steps": 2, **TINY},
    "mug": {"identifier": "olis", "class_word": "mug", "steps": 1, "seed": 3, **TINY},
    "toy": None,
}
COMMON_SETTINGS = ["class_word=toy", "steps=1", "resolution=64", "batch_size=1", "gradient_checkpointing=false"]


@pytest.fixture(scope="module")
def servers(host_root, workdir, checkpoint_name):
    cached = os.path.realpath(os.path.join(workdir, "models", "checkpoints", checkpoint_name))
    roots, instances = [], []
    try:
        for _ in range(2):
            root = tempfile.mkdtemp(prefix="perres-batch-server-")
            roots.append(root)
            config, _ = prepare_root(root, host_root)
            os.symlink(cached, os.path.join(root, "models", "checkpoints", checkpoint_name))
            instances.append(launch(host_root, root, config))
        for instance in instances:  # both start at the same time
            instance.wait_ready()
        yield instances
    finally:
        for instance in instances:
            instance.stop()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def concepts_dir():
    root = tempfile.mkdtemp(prefix="perres-batch-concepts-")
    for index, (name, settings) in enumerate(CONCEPTS.items()):
        folder = os.path.join(root, name)
        os.makedirs(folder)
        for image in range(2):
            Image.new("RGB", (64 + 16 * image, 64), (80 * index, 40 * image, 200)).save(
                os.path.join(folder, f"{image}.png"))
        if settings is not None:
            with open(os.path.join(folder, "concept.json"), "w") as handle:
                json.dump(settings, handle)
    os.makedirs(root + "-logs")
    yield root
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(root + "-logs", ignore_errors=True)


def start_tool(concepts_dir: str, urls: list[str], checkpoint: str) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, TOOL, concepts_dir, "--checkpoint", checkpoint, "--prefix", "perres"]
    for url in urls:
        command += ["--server", url]
    for setting in COMMON_SETTINGS:
        command += ["--set", setting]
    log_path = os.path.join(concepts_dir + "-logs", f"tool-{len(os.listdir(concepts_dir + '-logs'))}.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **LOOPBACK_ENV})
    return process, log_path


def finish(process: subprocess.Popen, log_path: str) -> tuple[int, str]:
    try:
        code = process.wait(timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    with open(log_path, errors="replace") as handle:
        return code, handle.read()


def running_concept(server, timeout_s: float = 120) -> str:
    """Wait until `server` runs one of the tool's prompts and return that concept's name."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, queue = server.request("GET", "/queue")
        assert status == 200, queue
        for item in queue["queue_running"]:
            prompt = item[2]
            saves = [node for node in prompt.values() if node["class_type"] == "PerResSaveResiduals"]
            return saves[0]["inputs"]["filename_prefix"].split("/")[-1]
        time.sleep(0.1)
    raise AssertionError(f"server {server.url} ran no prompt within {timeout_s} s:\n" + server.log_tail())


def residual_files(server) -> list[str]:
    root = server.path("models", "loras")
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def read_manifest(concepts_dir: str) -> dict:
    with open(os.path.join(concepts_dir, "perres_manifest.json")) as handle:
        return json.load(handle)


def test_batch_survives_a_killed_server_and_resumes(servers, concepts_dir, checkpoint_name):
    a, b = servers
    process, log_path = start_tool(concepts_dir, [a.url, b.url], checkpoint_name)
    killed = running_concept(a)
    a.process.kill()  # mid-run: A has accepted and is running the prompt of `killed`
    a.process.wait(timeout=30)
    code, output = finish(process, log_path)
    assert code == 0, output
    assert f"server lost: {a.url}" in output, output

    manifest = read_manifest(concepts_dir)["concepts"]
    assert sorted(manifest) == sorted(CONCEPTS), output
    assert manifest[killed]["server"] == b.url, (killed, manifest)
    assert not any(f.startswith(f"perres/{killed}") for f in residual_files(a)), "A finished despite the kill"
    load_residual_file = pack("perres_core.residual_file").load_residual_file
    for name, entry in manifest.items():
        settings = CONCEPTS[name] or {"identifier": "sks", "class_word": "toy", "steps": 1}
        assert entry["file"].startswith(f"perres/{name}_") and entry["file"].endswith(".safetensors"), entry
        path = os.path.join(b.root if entry["server"] == b.url else a.root, "models", "loras", entry["file"])
        residuals = load_residual_file(path)  # the concept's words and settings reached the server
        assert (residuals.concept.identifier, residuals.concept.class_word) == \
            (settings["identifier"], settings["class_word"])
        assert residuals.training["steps"] == str(settings["steps"]) and residuals.training["resolution"] == "64"
        assert isinstance(entry["final_loss"], float) and math.isfinite(entry["final_loss"]), entry
        assert entry["seconds"] > 0, entry
        # a progress bar per concept, driven by the server's progress events, reached its end
        steps = settings["steps"]
        assert any(name in line and f"{steps}/{steps}" in line for line in output.replace("\r", "\n").splitlines()), \
            (name, output)

    # Rerun: A is still dead (reported), B still has every file, so everything is skipped and nothing is written.
    files_before = residual_files(b)
    with open(os.path.join(concepts_dir, "perres_manifest.json"), "rb") as handle:
        manifest_before = handle.read()
    code, output = finish(*start_tool(concepts_dir, [a.url, b.url], checkpoint_name))
    assert code == 0, output
    assert all(f"{name}: already saved as" in output for name in CONCEPTS), output
    assert residual_files(b) == files_before
    with open(os.path.join(concepts_dir, "perres_manifest.json"), "rb") as handle:
        assert handle.read() == manifest_before

    # A new concept and no working server: non-zero, with what finished and what did not.
    extra = os.path.join(concepts_dir, "late")
    shutil.copytree(os.path.join(concepts_dir, "dog"), extra)
    try:
        code, output = finish(*start_tool(concepts_dir, [a.url], checkpoint_name))
    finally:
        shutil.rmtree(extra)
    assert code == 1, output
    assert "No server left" in output and "late" in output and "Finished: dog, mug, toy" in output, output


def test_the_masks_workflow_trains_every_concept_with_its_subject_masks(tmp_path):
    """--workflow example_workflows/api/perres_train_with_masks.json: RGBA cut-outs train with their alpha."""
    sys.path.insert(0, os.path.join(PACK_DIR, "tools"))
    import batch_concepts

    workflow = batch_concepts.load_workflow(os.path.join(PACK_DIR, "example_workflows", "api",
                                                         "perres_train_with_masks.json"))
    folder = tmp_path / "robot"
    folder.mkdir()
    Image.new("RGBA", (64, 64), (200, 0, 0, 0)).save(folder / "0.png")
    concept = batch_concepts.read_concept(str(folder), batch_concepts.train_settings(workflow))
    job = batch_concepts.training_prompt(workflow, concept, "sd15.safetensors", "perres")
    images = batch_concepts.node_of(job.prompt, "PerResLoadConceptImages")
    train = job.prompt[job.train_node]["inputs"]
    assert train["masks"] == [images, 1] and train["background_weight"] == 0.1
    assert job.prompt[images]["inputs"]["folder"] == concept.upload_folder
