"""Bad prompts through the real HTTP API of a ComfyUI server, then a good one; the server never dies.

The test starts `python main.py --cpu` (tests/comfy_server.py) on a free loopback port with its own models,
custom_nodes, input, output, temp and user folders (the pack is loaded from a temp custom_nodes folder that
holds a symlink to this checkout), POSTs prompts to /prompt and reads the outcome from /history.
Validation errors must come back as HTTP 400 with node_errors; execution errors must show the pack's
message (node name, what is wrong, how to fix it) in the history, and nothing may be written.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import tempfile

import pytest
import torch
from PIL import Image

from comfy_host import PACK_DIR
from comfy_server import PROMPT_TIMEOUT_S, prepare_root, running_server, write_residual
from conftest import pack
from sd15_checkpoint import CHECKPOINT_NAME, link_sd15_checkpoint

pytestmark = pytest.mark.every_host  # the server and its websocket messages differ between hosts


class _MakeDir:
    """Unpickling this creates a directory: proof that a pickle was (wrongly) executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _prepare(root: str, comfy_root: str) -> tuple[str, str]:
    """The test server's folders plus the files the bad prompts need; returns prepare_root's result."""
    config, pack_folder = prepare_root(root, comfy_root)
    loras = os.path.join(root, "models", "loras", "perres")
    write_residual(os.path.join(loras, "good.safetensors"), "sks", "dog")
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
    link_sd15_checkpoint(root)
    return config, pack_folder


@pytest.fixture(scope="module")
def server(host_root):
    root = tempfile.mkdtemp(prefix="perres-http-")
    try:
        # previews as a user who turned them on sees them (ComfyUI's own default is none)
        with running_server(host_root, root, *_prepare(root, host_root),
                            extra_args=("--preview-method", "latent2rgb")) as instance:
            yield instance
    finally:
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


def test_help_pages_are_served_where_the_frontend_asks(server):
    """The frontend asks /extensions/<pack folder>/docs/<NodeId>.md, the folder taken from python_module."""
    import nodes

    pack_nodes = sorted(n for n in nodes.NODE_CLASS_MAPPINGS if n.startswith("PerRes"))
    for node_id in pack_nodes:
        status, info = server.request("GET", f"/object_info/{node_id}")
        assert status == 200, info
        folder = info[node_id]["python_module"].split(".")[1]  # "custom_nodes.<folder>", as the frontend reads it
        status, page = server.request("GET", f"/extensions/{folder}/docs/{node_id}.md")
        assert status == 200, (node_id, page)
        with open(os.path.join(PACK_DIR, "web", "docs", f"{node_id}.md"), encoding="utf-8") as handle:
            assert page == handle.read(), node_id


def test_residual_list_shows_perres_files_also_those_saved_while_running(server):
    status, body = server.queue(load_and_save("perres/good.safetensors", "perres/listed"))
    assert status == 200, body
    assert server.wait_for(body["prompt_id"])["status"]["status_str"] == "success"
    status, info = server.request("GET", "/object_info/PerResLoadResiduals")
    options = info["PerResLoadResiduals"]["input"]["required"]["residual_name"][1]["options"]
    assert "perres/good.safetensors" in options and "perres/listed_00001.safetensors" in options, options
    assert "perres/lora.safetensors" not in options and "perres/evil.pt" not in options, options


def node_texts(messages: list[tuple[int, bytes]]) -> list[tuple[str, str]]:
    """(node id, text) of each binary TEXT message (type 3: node id length, node id, text)."""
    texts = []
    for event, payload in messages:
        if event == 3:
            length, = struct.unpack(">I", payload[:4])
            texts.append((payload[4:4 + length].decode(), payload[4 + length:].decode()))
    return texts


def test_warning_reaches_a_websocket_client_on_its_node(server):
    """A single reference image: the warning arrives during the run as a binary TEXT message, which the
    frontend shows under that node."""
    folder = server.path("input", "perres_single")
    os.makedirs(folder, exist_ok=True)
    Image.new("RGB", (64, 64), (200, 40, 40)).save(os.path.join(folder, "only.png"))
    texts = node_texts(websocket_messages(server, images_preview("perres_single"), "perres-ws-test"))
    assert any(node == "1" and "only one reference image in 'perres_single'" in text for node, text in texts), texts


def websocket_messages(server, prompt: dict, client_id: str) -> list[tuple[int, bytes]]:
    """Queue `prompt` as `client_id` and collect its websocket messages until it ends: (binary event type,
    payload) for binary ones, (0, json text) for the others."""
    import asyncio

    import aiohttp

    async def run() -> list[tuple[int, bytes]]:
        received = []
        async with aiohttp.ClientSession() as session:  # no proxy: aiohttp ignores the environment's
            async with session.ws_connect(f"{server.url}/ws?clientId={client_id}", max_msg_size=0) as ws:
                response = await session.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": client_id})
                prompt_id = (await response.json())["prompt_id"]
                while True:
                    message = await asyncio.wait_for(ws.receive(), PROMPT_TIMEOUT_S)
                    if message.type == aiohttp.WSMsgType.BINARY:
                        event, = struct.unpack(">I", message.data[:4])
                        received.append((event, message.data[4:]))
                    elif message.type == aiohttp.WSMsgType.TEXT:
                        received.append((0, message.data.encode()))
                        data = json.loads(message.data)
                        if data["type"] in ("execution_success", "execution_error") \
                                and data["data"].get("prompt_id") == prompt_id:
                            assert data["type"] == "execution_success", data
                            return received
                    else:
                        raise AssertionError(f"websocket closed: {message}")

    return asyncio.run(run())


def test_training_previews_and_progress_text_reach_a_websocket_client(server):
    """What an API client (and the frontend) receives while PerRes Train Residuals runs: 'progress' messages
    for node 3, JPEG previews (binary type 1, or 4 with metadata on hosts whose clients ask for it) and the
    node's text line (type 3) with step and loss; the snapshot is written under models/loras."""
    prompt = train_prompt(steps=4, batch_size=1, gradient_checkpointing=False, preview_every=2, snapshot_every=2,
                          snapshot_prefix="perres/ws_snapshot")
    prompt["1"]["inputs"]["ckpt_name"] = CHECKPOINT_NAME
    messages = websocket_messages(server, prompt, "perres-watch")
    progress = [json.loads(payload)["data"] for event, payload in messages
                if event == 0 and json.loads(payload)["type"] == "progress"]
    assert [(p["value"], p["max"]) for p in progress if p.get("node") == "3"][-1] == (4, 4), progress
    jpegs = [payload for event, payload in messages if event in (1, 4) and b"\xff\xd8\xff" in payload[:400]]
    assert len(jpegs) == 3, [event for event, _ in messages]  # steps 1, 2 and 4
    texts = node_texts(messages)
    train_texts = [text for node, text in texts if node == "3"]
    assert any(text.startswith("step 2/4 · loss ") for text in train_texts), texts
    assert train_texts[-1].startswith("step 4/4 · loss ") and "done in" in train_texts[-1], texts
    assert "last snapshot: perres/ws_snapshot_step00004_00001.safetensors" in train_texts[-1]
    assert os.path.exists(server.path("models", "loras", "perres", "ws_snapshot_step00002_00001.safetensors"))


def test_server_survived_everything(server):
    assert server.alive(), server.log_tail()
    status, stats = server.request("GET", "/system_stats")
    assert status == 200 and "system" in stats
    status, queue = server.request("GET", "/queue")
    assert status == 200 and not queue["queue_running"] and not queue["queue_pending"], queue
    assert not os.path.exists(server.path("UNPICKLED"))
