"""Hand concepts to free ComfyUI servers until all are trained, failed, or no server is left.

There is no scheduler beyond that: one worker per server takes the next pending concept, and a concept
whose server stops answering goes back to the front of the queue for the servers that remain.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import aiohttp
from tqdm import tqdm

from batch_concepts import Concept, TrainingPrompt, read_results
from batch_manifest import load_manifest, save_manifest
from batch_server import ComfyServer, ConceptFailed, ServerGone

log = logging.getLogger("perres.batch")
PromptFor = Callable[[Concept], TrainingPrompt]
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=300, sock_connect=10)  # per request; training has its own limit


@dataclass
class Outcome:
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # concept → message
    unfinished: list[str] = field(default_factory=list)  # left over when every server was gone
    lost_servers: dict[str, str] = field(default_factory=dict)  # url → why
    manifest: dict[str, dict] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.unfinished


class _Queue:
    """Pending concepts plus the number in flight: a worker with nothing to do waits while a concept could
    still come back from a server that dies, and stops once nothing is pending or in flight."""

    def __init__(self, concepts: list[Concept]) -> None:
        self.pending = collections.deque(concepts)
        self.in_flight = 0
        self.changed = asyncio.Condition()

    async def take(self) -> Concept | None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.pending or not self.in_flight)
            if not self.pending:
                return None
            self.in_flight += 1
            return self.pending.popleft()

    async def done(self, concept: Concept, retry: bool) -> None:
        async with self.changed:
            self.in_flight -= 1
            if retry:
                self.pending.appendleft(concept)
            self.changed.notify_all()


async def _reachable(servers: list[ComfyServer], outcome: Outcome) -> list[ComfyServer]:
    live = []
    for server in servers:
        try:
            await server.check()
            live.append(server)
        except ServerGone as exc:
            outcome.lost_servers[server.url] = str(exc)
            log.warning("skipping server: %s", exc)
    return live


async def _already_saved(concepts: list[Concept], servers: list[ComfyServer], outcome: Outcome) -> list[Concept]:
    """Drop concepts whose manifest entry names a file that one of the servers still has; return the rest."""
    files: set[str] = set()
    for server in servers:
        try:
            files |= await server.loras()
        except ServerGone as exc:
            log.warning("could not list the residual files of %s: %s", server.url, exc)
    todo = []
    for concept in concepts:
        entry = outcome.manifest.get(concept.name)
        if entry and entry["file"] in files:
            outcome.skipped.append(concept.name)
            log.info("%s: already saved as %s, skipped", concept.name, entry["file"])
            continue
        if entry:
            log.warning("%s: %s is on none of the servers; training it again", concept.name, entry["file"])
        todo.append(concept)
    return todo


async def _train_one(server: ComfyServer, concept: Concept, prompt_for: PromptFor, position: int,
                     timeout_s: float) -> dict:
    bar = tqdm(desc=f"{concept.name} @ {server.url.split('//')[-1]}", total=None, unit="step",
               position=position, leave=True, dynamic_ncols=True)

    def on_progress(value: int, maximum: int) -> None:
        bar.total = maximum
        bar.n = value
        bar.refresh()

    try:
        await server.upload(concept)
        finished = await server.run(prompt_for(concept), on_progress, timeout_s)
    finally:
        bar.close()
    try:
        file, loss = read_results(finished.outputs)
    except (KeyError, IndexError) as exc:
        raise ConceptFailed(f"the server's history lacks the saved file name ({exc!r}); is Preview Any missing?") \
            from exc
    return {"file": file, "final_loss": loss, "seconds": round(finished.seconds, 2), "server": server.url,
            "identifier": concept.settings["identifier"], "class_word": concept.settings["class_word"]}


async def _worker(server: ComfyServer, position: int, queue: _Queue, prompt_for: PromptFor, outcome: Outcome,
                  manifest_path: str, timeout_s: float) -> None:
    while (concept := await queue.take()) is not None:
        try:
            entry = await _train_one(server, concept, prompt_for, position, timeout_s)
        except ServerGone as exc:
            outcome.lost_servers[server.url] = str(exc)
            log.error("%s: server lost (%s); '%s' goes back to the queue", server.url, exc, concept.name)
            await queue.done(concept, retry=True)
            return
        except ConceptFailed as exc:
            outcome.failed[concept.name] = str(exc)
            log.error("%s: failed on %s: %s", concept.name, server.url, exc)
            await queue.done(concept, retry=False)
            continue
        outcome.manifest[concept.name] = entry
        outcome.trained.append(concept.name)
        save_manifest(manifest_path, outcome.manifest)
        log.info("%s: saved %s (loss %s, %.1f s) on %s", concept.name, entry["file"], entry["final_loss"],
                 entry["seconds"], server.url)
        await queue.done(concept, retry=False)


async def run_batch(concepts: list[Concept], urls: list[str], prompt_for: PromptFor, manifest_path: str,
                    timeout_s: float) -> Outcome:
    """Train every concept not yet in the manifest on the servers at `urls`; the manifest grows per concept."""
    outcome = Outcome(manifest=load_manifest(manifest_path))
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        servers = await _reachable([ComfyServer(url, session) for url in urls], outcome)
        if not servers:
            outcome.unfinished = [c.name for c in concepts if c.name not in outcome.manifest]
            return outcome
        todo = await _already_saved(concepts, servers, outcome)
        queue = _Queue(todo)
        await asyncio.gather(*(_worker(server, index, queue, prompt_for, outcome, manifest_path, timeout_s)
                               for index, server in enumerate(servers)))
        outcome.unfinished = [concept.name for concept in queue.pending]
    log.info("batch finished in %.1f s", time.monotonic() - started)
    return outcome
