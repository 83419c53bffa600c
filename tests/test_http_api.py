"""Bad prompts through the real HTTP API of a ComfyUI server, then a good one; the server never dies.

The test starts `python main.py --cpu` on a free loopback port with its own models, custom_nodes,
input, output, temp and user folders (the pack is loaded from a temp custom_nodes folder that holds a
symlink to this checkout), POSTs prompts to /prompt and reads the outcome from /history.
Validation errors must come back as HTTP 400 with node_errors; execution errors must show the pack's
message (node name, what is wrong, how to fix it) in the history, and nothing may be written.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
import torch
from PIL import Image

from comfy_host import PACK_DIR
from conftest import pack

STARTUP_TIMEOUT_S = 300
PROMPT_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _MakeDir:
    """Unpickling this creates a directory: proof that a pickle was (wrongly) executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


class Server:
    def __init__(self, root: str, port: int, process: subprocess.Popen, log_path: str) -> None:
        self.root, self.port, self.process, self.log_path = root, port, process, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def log_tail(self, chars: int = 4000) -> str:
        with open(self.log_path, "r", errors="replace") as handle:
            return handle.read()[-chars:]

    def alive(self) -> bool:
        return self.process.poll() is None

    def request(self, method: str, route: str, body=None, raw: bytes | None = None):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.url + route, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with self.opener.open(request, timeout=30) as response:
                return response.status, _parse(response.read())
        except urllib.error.HTTPError as error:
            return error.code, _parse(error.read())

    def queue(self, prompt: dict):
        return self.request("POST", "/prompt", {"prompt": prompt, "client_id": "perres-tests"})

    def wait_for(self, prompt_id: str) -> dict:
        deadline = time.monotonic() + PROMPT_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.alive(), "the server died:\n" + self.log_tail()
            status, history = self.request("GET", f"/history/{prompt_id}")
            if status == 200 and prompt_id in (history or {}):
                entry = history[prompt_id]
                if entry.get("status", {}).get("completed") is not None:
                    return entry
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish in {PROMPT_TIMEOUT_S} s:\n" + self.log_tail())


def _parse(raw: bytes):
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return raw.decode(errors="replace")


def _prepare(root: str, comfy_root: str) -> str:
    """Folders, files and the extra_model_paths yaml of the test server; returns the yaml path."""
    for sub in ("models/checkpoints", "models/loras/perres", "custom_nodes", "input", "output", "temp", "user"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    # A checkout inside the host's own custom_nodes/ is loaded from there; never load the pack twice.
    host_custom_nodes = os.path.realpath(os.path.join(comfy_root, "custom_nodes"))
    installed = os.path.realpath(os.path.dirname(PACK_DIR)) == host_custom_nodes
    if not installed:
        os.symlink(PACK_DIR, os.path.join(root, "custom_nodes", "perres"))

    residual, layout, residual_file = pack("perres_core.residual"), pack("perres_core.sd15_layout"), \
        pack("perres_core.residual_file")
    residuals = residual.ResidualSet.create(layout.sd15_layer_shapes(), 0.05,
                                            concept=residual.ConceptInfo("sks", "dog"))
    residuals.initialize("random", 0)
    loras = os.path.join(root, "models", "loras", "perres")
    residual_file.save_residual_file(residuals, os.path.join(loras, "good.safetensors"), "test")
    from safetensors.torch import save_file
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(1280, 4, 1, 1),
               "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 1280, 1, 1)},
              os.path.join(loras, "lora.safetensors"), metadata={"ss_network_module": "networks.lora"})
    with open(os.path.join(loras, "evil.pt"), "wb") as handle:
        pickle.dump(_MakeDir(os.path.join(root, "UNPICKLED")), handle)

    for folder, size in (("perres_ok", 64), ("perres_tiny", 32)):
        os.makedirs(os.path.join(root, "input", folder))
        for index in range(2):
            Image.new("RGB", (size, size + 8 * index), (40 * index, 120, 200)).save(
                os.path.join(root, "input", folder, f"{index}.png"))

    config = os.path.join(root, "extra_model_paths.yaml")
    with open(config, "w") as handle:
        handle.write(f"perres_tests:\n    base_path: {root}\n    is_default: true\n"
                     "    checkpoints: models/checkpoints\n    loras: models/loras\n    custom_nodes: custom_nodes\n")
    return config


@pytest.fixture(scope="module")
def server(host_root):
    root = tempfile.mkdtemp(prefix="perres-http-")
    config = _prepare(root, host_root)
    port = free_port()
    log_path = os.path.join(root, "server.log")
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-auto-launch", "--extra-model-paths-config", config,
               "--input-directory", os.path.join(root, "input"), "--output-directory", os.path.join(root, "output"),
               "--temp-directory", os.path.join(root, "temp"), "--user-directory", os.path.join(root, "user"),
               "--database-url", "sqlite:///:memory:"]
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=host_root, stdout=log, stderr=subprocess.STDOUT, env=env)
    instance = Server(root, port, process, log_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if not instance.alive():
                raise AssertionError("the server exited during startup:\n" + instance.log_tail())
            try:
                status, _ = instance.request("GET", "/object_info/PerResLoadResiduals")
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not answer in {STARTUP_TIMEOUT_S} s:\n" + instance.log_tail())
            time.sleep(0.5)
        status, info = instance.request("GET", "/object_info/PerResLoadResiduals")
        assert "PerResLoadResiduals" in info, f"the pack was not loaded:\n{instance.log_tail()}"
        yield instance
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def load_and_save(residual_name: str, prefix: str) -> dict:
    return {"1": {"class_type": "PerResLoadResiduals", "inputs": {"residual_name": residual_name}},
            "2": {"class_type": "PerResSaveResiduals", "inputs": {"residuals": ["1", 0], "filename_prefix": prefix}}}


def images_preview(folder: str, resolution: int = 64) -> dict:
    return {"1": {"class_type": "PerResLoadConceptImages", "inputs": {"folder": folder, "resolution": resolution}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


def train_prompt(**overrides) -> dict:
    train = dict(model=["1", 0], clip=["1", 1], vae=["1", 2], images=["2", 0], identifier="sks", class_word="dog",
                 steps=0, batch_size=2, learning_rate=1e-3, rank_ratio=0.05, resolution=64, seed=0, init="random")
    train.update(overrides)
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "missing.safetensors"}},
            "2": {"class_type": "PerResLoadConceptImages", "inputs": {"folder": "perres_ok", "resolution": 64}},
            "3": {"class_type": "PerResTrainResiduals", "inputs": train},
            "4": {"class_type": "PerResSaveResiduals", "inputs": {"residuals": ["3", 1], "filename_prefix": "x"}}}


# Rejected at validation: HTTP 400, nothing runs.
INVALID_PROMPTS = [
    ("malformed_json", dict(raw=b"{this is not json"), None),
    ("no_prompt_field", dict(body={"client_id": "perres-tests"}), "no_prompt"),
    ("no_output_node", dict(prompt={"1": {"class_type": "PerResLoadResiduals",
                                          "inputs": {"residual_name": "perres/good.safetensors"}}}),
     "prompt_no_outputs"),
    # ComfyUI 0.3.64 calls an unknown node type "invalid_prompt", newer hosts "missing_node_type".
    ("unknown_node_type", dict(prompt={"1": {"class_type": "NoSuchPerResNode", "inputs": {}}}),
     ("invalid_prompt", "missing_node_type")),
    ("train_zero_steps", dict(prompt=train_prompt(), node_error=("3", "steps")), "prompt_outputs_failed_validation"),
    ("missing_input", dict(prompt={"1": {"class_type": "PerResLoadConceptImages", "inputs": {"resolution": 64}},
                                   "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}),
     "prompt_outputs_failed_validation"),
]


@pytest.mark.parametrize("request_kwargs, error_type", [c[1:] for c in INVALID_PROMPTS],
                         ids=[c[0] for c in INVALID_PROMPTS])
def test_invalid_prompt_is_rejected(server, request_kwargs, error_type):
    if "prompt" in request_kwargs:
        status, body = server.queue(request_kwargs["prompt"])
    else:
        status, body = server.request("POST", "/prompt", request_kwargs.get("body"), raw=request_kwargs.get("raw"))
    assert 400 <= status < 600, (status, body)
    if error_type is not None:
        accepted = (error_type,) if isinstance(error_type, str) else error_type
        assert status == 400 and body["error"]["type"] in accepted, body
    if "node_error" in request_kwargs:
        node_id, fragment = request_kwargs["node_error"]
        details = [error["details"] for error in body["node_errors"][node_id]["errors"]]
        assert any(fragment in detail for detail in details), body["node_errors"]
    assert server.alive(), server.log_tail()
    assert not os.path.exists(server.path("UNPICKLED")), "a pickle file was unpickled"


# Accepted, then fail while running: the history shows the pack's message.
FAILING_PROMPTS = [
    # residual_name is a V3 combo. ComfyUI 0.3.64 does not check combo values against their options, so the
    # node itself refuses these; newer hosts refuse them at validation (see COMBO_CASES).
    ("pickle_file", load_and_save("perres/evil.pt", "perres/x"), "PerRes Load Residuals",
     ("pickle file", "never unpickles", "Only .safetensors")),
    ("residual_name_path_traversal", load_and_save("../../../../etc/passwd", "perres/x"), "PerRes Load Residuals",
     ("not in models/loras", "refresh")),
    ("ordinary_lora", load_and_save("perres/lora.safetensors", "perres/x"), "PerRes Load Residuals",
     ("ordinary LoRA", "LoraLoader")),
    ("prefix_path_traversal", load_and_save("perres/good.safetensors", "../../escape"), "PerRes Save Residuals",
     ("'..'", "no '..'")),
    ("prefix_absolute", load_and_save("perres/good.safetensors", "/tmp/perres_http_escape"), "PerRes Save Residuals",
     ("absolute path", "relative to models/loras")),
    ("prefix_drive_letter", load_and_save("perres/good.safetensors", "D:\\escape"), "PerRes Save Residuals",
     ("absolute path", "relative to models/loras")),
    ("folder_outside_input", images_preview("../../.."), "PerRes Load Concept Images",
     ("outside ComfyUI's input directory", "relative to it")),
    ("missing_folder", images_preview("no_such_folder"), "PerRes Load Concept Images",
     ("does not exist", "input directory")),
    ("tiny_images", images_preview("perres_tiny"), "PerRes Load Concept Images", ("at least 64 px", "Replace it")),
    ("resolution_not_multiple_of_8", images_preview("perres_ok", 100), "PerRes Load Concept Images",
     ("multiple of 8", "512")),
]


COMBO_CASES = {"pickle_file", "residual_name_path_traversal", "ordinary_lora"}


def refused_as_not_in_list(body: dict, node_id: str, name: str, value: str) -> bool:
    """True when the host refused a combo value itself: HTTP 400 naming the input and the value."""
    errors = body.get("node_errors", {}).get(node_id, {}).get("errors", [])
    return body.get("error", {}).get("type") == "prompt_outputs_failed_validation" and any(
        error.get("type") == "value_not_in_list" and error.get("extra_info", {}).get("input_name") == name
        and error["extra_info"].get("received_value") == value for error in errors)


@pytest.mark.parametrize("prompt, node, fragments", [c[1:] for c in FAILING_PROMPTS],
                         ids=[c[0] for c in FAILING_PROMPTS])
def test_failing_prompt_reports_the_pack_message(server, prompt, node, fragments, request):
    before = sorted(os.listdir(server.root)), sorted(os.walk(server.path("models")))
    status, body = server.queue(prompt)
    if status == 400 and request.node.callspec.id in COMBO_CASES:
        # The host's own combo check (newer ComfyUI): refused before the pack runs, nothing written.
        value = prompt["1"]["inputs"]["residual_name"]
        assert refused_as_not_in_list(body, "1", "residual_name", value), body
        assert (sorted(os.listdir(server.root)), sorted(os.walk(server.path("models")))) == before
        assert server.alive(), server.log_tail()
        return
    assert status == 200, body
    entry = server.wait_for(body["prompt_id"])
    assert entry["status"]["status_str"] == "error", entry["status"]
    errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert errors, entry["status"]["messages"]
    message = errors[0]["exception_message"].strip()
    assert message.startswith(node + ": "), message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), (fragment, message)
    assert (sorted(os.listdir(server.root)), sorted(os.walk(server.path("models")))) == before, "a file was written"
    assert not os.path.exists("/tmp/perres_http_escape_00001.safetensors")
    assert server.alive(), server.log_tail()


def test_good_prompt_after_the_bad_ones_succeeds(server):
    prompt = {**images_preview("perres_ok"),
              "3": {"class_type": "PerResLoadResiduals", "inputs": {"residual_name": "perres/good.safetensors"}},
              "4": {"class_type": "PerResSaveResiduals", "inputs": {"residuals": ["3", 0],
                                                                    "filename_prefix": "perres/from_http"}}}
    status, body = server.queue(prompt)
    assert status == 200 and not body["node_errors"], body
    entry = server.wait_for(body["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["4"]["text"] == ["saved models/loras/perres/from_http_00001.safetensors"], entry["outputs"]
    assert len(entry["outputs"]["2"]["images"]) == 2
    saved = server.path("models", "loras", "perres", "from_http_00001.safetensors")
    assert os.path.getsize(saved) > 1_000_000
    assert len(pack("perres_core.residual_file").load_residual_file(saved).layers) == 16


def test_server_survived_everything(server):
    assert server.alive(), server.log_tail()
    status, stats = server.request("GET", "/system_stats")
    assert status == 200 and "system" in stats
    status, queue = server.request("GET", "/queue")
    assert status == 200 and not queue["queue_running"] and not queue["queue_pending"], queue
    assert not os.path.exists(server.path("UNPICKLED"))
