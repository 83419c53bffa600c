"""One ComfyUI server as the batch tool uses it: upload images, queue a prompt, follow it over the websocket.

Only ComfyUI's own HTTP API and websocket are used (aiohttp, which ComfyUI itself installs). A server
that refuses connections, drops the websocket or stays silent past the time limit raises ServerGone, so
its concept can go to another server; a prompt that the server ran and that failed raises ConceptFailed.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import aiohttp

from batch_concepts import Concept, TrainingPrompt

log = logging.getLogger("perres.batch")
WS_MAX_MESSAGE = 64 * 2**20  # preview images from other users' prompts can be large
HEARTBEAT_S = 30  # a vanished remote host shows as a missing pong within about this time
HISTORY_TRIES, HISTORY_WAIT_S = 100, 0.2

Progress = Callable[[int, int], None]  # (value, max) of the Train node's progress bar


class ServerGone(Exception):
    """The server stopped answering: refused connection, closed websocket or time limit."""


class ConceptFailed(Exception):
    """The server rejected or ran the prompt and it failed; another server would fail the same way."""


@dataclass
class Finished:
    outputs: dict[str, dict]
    seconds: float


class ComfyServer:
    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url.rstrip("/")
        self.session = session
        self.ws_url = "ws" + self.url.removeprefix("http")  # http→ws, https→wss

    async def _get(self, route: str):
        try:
            async with self.session.get(self.url + route) as response:
                if response.status != 200:
                    raise ServerGone(f"{self.url}{route} answered HTTP {response.status}")
                return await response.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise ServerGone(f"{self.url} does not answer ({exc or type(exc).__name__})") from exc

    async def check(self) -> None:
        """Raise ServerGone unless the server answers and has PerRes loaded."""
        info = await self._get("/object_info/PerResTrainResiduals")
        if "PerResTrainResiduals" not in info:
            raise ServerGone(f"{self.url} answers but has no PerRes nodes; install the pack there.")

    async def loras(self) -> set[str]:
        """Files under the server's models/loras, as 'sub/dir/name.safetensors'."""
        return {name.replace("\\", "/") for name in await self._get("/models/loras")}

    async def upload(self, concept: Concept) -> None:
        """Put the concept's images in input/<concept.upload_folder>/ on the server (overwriting same names)."""
        for name in concept.images:
            with open(os.path.join(concept.folder, name), "rb") as handle:
                data = handle.read()
            form = aiohttp.FormData()
            form.add_field("image", data, filename=name)
            form.add_field("subfolder", concept.upload_folder)
            form.add_field("type", "input")
            form.add_field("overwrite", "true")
            try:
                async with self.session.post(self.url + "/upload/image", data=form) as response:
                    if response.status != 200:
                        raise ConceptFailed(f"uploading '{name}' failed: HTTP {response.status} "
                                            f"{(await response.text())[:300]}")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise ServerGone(f"{self.url} stopped answering during the upload ({exc})") from exc

    async def run(self, job: TrainingPrompt, on_progress: Progress, timeout_s: float) -> Finished:
        """Queue `job`, report the Train node's progress, return its history outputs when it has finished."""
        try:
            return await asyncio.wait_for(self._run(job, on_progress), timeout_s)
        except asyncio.TimeoutError as exc:
            raise ServerGone(f"{self.url} did not finish the prompt within {timeout_s:.0f} s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ServerGone(f"{self.url} stopped answering ({exc or type(exc).__name__})") from exc

    async def _run(self, job: TrainingPrompt, on_progress: Progress) -> Finished:
        client_id = uuid.uuid4().hex
        # The websocket is opened first so that no event of the prompt is missed.
        async with self.session.ws_connect(f"{self.ws_url}/ws?clientId={client_id}", heartbeat=HEARTBEAT_S,
                                           max_msg_size=WS_MAX_MESSAGE) as ws:
            prompt_id = await self._queue(job, client_id)
            started = time.monotonic()
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue  # binary previews
                event = message.json()
                kind, data = event.get("type"), event.get("data") or {}
                if data.get("prompt_id") != prompt_id:
                    continue
                if kind == "execution_start":
                    started = time.monotonic()  # the time spent waiting behind other prompts does not count
                elif kind == "progress" and str(data.get("node")) == job.train_node:
                    on_progress(int(data["value"]), int(data["max"]))
                elif kind == "execution_error":
                    raise ConceptFailed(f"{data.get('node_type')}: {str(data.get('exception_message')).strip()}")
                elif kind == "execution_interrupted":
                    raise ConceptFailed("the prompt was interrupted on the server")
                elif kind == "execution_success" or (kind == "executing" and data.get("node") is None):
                    seconds = time.monotonic() - started
                    return Finished(await self._outputs(prompt_id), seconds)
            raise ServerGone(f"{self.url} closed the websocket while running the prompt")

    async def _queue(self, job: TrainingPrompt, client_id: str) -> str:
        async with self.session.post(self.url + "/prompt",
                                     json={"prompt": job.prompt, "client_id": client_id}) as response:
            body = await response.json(content_type=None)
            if response.status == 400:  # validation: the same prompt fails on every server
                raise ConceptFailed(f"the server refused the prompt: {body}")
            if response.status != 200:
                raise ServerGone(f"{self.url}/prompt answered HTTP {response.status}: {body}")
            return body["prompt_id"]

    async def _outputs(self, prompt_id: str) -> dict[str, dict]:
        # ComfyUI sends execution_success before it files the prompt in the history, so look a few times.
        for _ in range(HISTORY_TRIES):
            entry = (await self._get(f"/history/{prompt_id}")).get(prompt_id)
            if entry is not None:
                return entry["outputs"]
            await asyncio.sleep(HISTORY_WAIT_S)
        raise ConceptFailed(f"prompt {prompt_id} finished but is not in the server's history "
                            f"after {HISTORY_TRIES * HISTORY_WAIT_S:.0f} s")
