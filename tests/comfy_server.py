"""A real ComfyUI server (`python main.py --cpu`) for the tests and tools that talk to it over HTTP or
drive its frontend: a free loopback port, its own models, custom_nodes, input, output, temp and user
folders (the pack is loaded from a custom_nodes folder that holds a symlink to this checkout).

Used by tests/test_http_api.py, tests/test_ui.py and tools/make_thumbnails.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Iterator

from comfy_host import PACK_DIR, pack

STARTUP_TIMEOUT_S = 300
PROMPT_TIMEOUT_S = 120
PACK_FOLDER = "perres"  # the pack's folder name under the test server's custom_nodes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, root: str, port: int, process: subprocess.Popen, log_path: str, pack_folder: str) -> None:
        self.root, self.port, self.process, self.log_path = root, port, process, log_path
        self.pack_folder = pack_folder  # the name the frontend uses for the pack's templates and extensions
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
        status, payload, _ = self.fetch(method, route, body, raw)
        return status, _parse(payload)

    def fetch(self, method: str, route: str, body=None, raw: bytes | None = None) -> tuple[int, bytes, str]:
        """(status, raw body, content type) of one request."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.url + route, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with self.opener.open(request, timeout=30) as response:
                return response.status, response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            return error.code, error.read(), error.headers.get("Content-Type", "")

    def queue(self, prompt: dict):
        return self.request("POST", "/prompt", {"prompt": prompt, "client_id": "perres-tests"})

    def wait_ready(self) -> None:
        """Block until the server answers with the pack's nodes loaded (bounded by STARTUP_TIMEOUT_S)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if not self.alive():
                raise AssertionError("the server exited during startup:\n" + self.log_tail())
            try:
                status, info = self.request("GET", "/object_info/PerResLoadResiduals")
                if status == 200:
                    assert "PerResLoadResiduals" in info, f"the pack was not loaded:\n{self.log_tail()}"
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not answer in {STARTUP_TIMEOUT_S} s:\n" + self.log_tail())
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)

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


def prepare_root(root: str, comfy_root: str) -> tuple[str, str]:
    """Folders and the extra_model_paths yaml of a test server; returns (yaml path, pack folder name)."""
    for sub in ("models/checkpoints", "models/loras/perres", "custom_nodes", "input", "output", "temp", "user"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    # A checkout inside the host's own custom_nodes/ is loaded from there; never load the pack twice.
    host_custom_nodes = os.path.realpath(os.path.join(comfy_root, "custom_nodes"))
    installed = os.path.realpath(os.path.dirname(PACK_DIR)) == host_custom_nodes
    if installed:
        pack_folder = os.path.basename(PACK_DIR)
    else:
        pack_folder = PACK_FOLDER
        os.symlink(PACK_DIR, os.path.join(root, "custom_nodes", pack_folder))
    config = os.path.join(root, "extra_model_paths.yaml")
    with open(config, "w") as handle:
        handle.write(f"perres_tests:\n    base_path: {root}\n    is_default: true\n"
                     "    checkpoints: models/checkpoints\n    loras: models/loras\n    custom_nodes: custom_nodes\n"
                     "    diffusion_models: models/diffusion_models\n    text_encoders: models/text_encoders\n"
                     "    vae: models/vae\n")
    return config, pack_folder


def write_residual(path: str, identifier: str = "sks", class_word: str = "dog") -> str:
    """A valid PerRes residual file (random init, not trained), written by the pack's own writer."""
    residual = pack("perres_core.residual")
    residuals = residual.ResidualSet.create(pack("perres_core.families").SD1.layer_shapes(), 0.05,
                                            concept=residual.ConceptInfo(identifier, class_word))
    residuals.initialize("random", 0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pack("perres_core.residual_file").save_residual_file(residuals, path, "test")
    return path


LOOPBACK_ENV = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def launch(host_root: str, root: str, config: str, pack_folder: str = PACK_FOLDER,
           log_name: str = "server.log", extra_args: tuple[str, ...] = ()) -> Server:
    """Start `main.py --cpu` (plus `extra_args`) on a free loopback port with the folders of `root` (prepared
    by prepare_root); call wait_ready() next, and stop() when done."""
    port = free_port()
    log_path = os.path.join(root, log_name)
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-auto-launch", "--extra-model-paths-config", config,
               "--input-directory", os.path.join(root, "input"), "--output-directory", os.path.join(root, "output"),
               "--temp-directory", os.path.join(root, "temp"), "--user-directory", os.path.join(root, "user"),
               "--database-url", "sqlite:///:memory:", *extra_args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=host_root, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **LOOPBACK_ENV})
    return Server(root, port, process, log_path, pack_folder)


@contextlib.contextmanager
def running_server(host_root: str, root: str, config: str, pack_folder: str,
                   log_name: str = "server.log", extra_args: tuple[str, ...] = ()) -> Iterator[Server]:
    """A started server whose pack answers, stopped on exit."""
    instance = launch(host_root, root, config, pack_folder, log_name, extra_args)
    try:
        instance.wait_ready()
        yield instance
    finally:
        instance.stop()
