"""Warnings that reach the user where they look: on the node in the frontend, and in the console.

The frontend shows text that a running node sends with `PromptServer.send_progress_text` (a binary
websocket message, type 3: the node id, then the text) under that node. A node's later text replaces
the earlier one, so each message repeats the warnings the node gave so far in this run.
"""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("perres")


def node_id_of(node_cls) -> str | None:
    """The prompt's id of the executing node (V3 hidden input UNIQUE_ID); None outside an executor."""
    hidden = getattr(node_cls, "hidden", None)
    node_id = getattr(hidden, "unique_id", None)
    return None if node_id is None else str(node_id)


class NodeWarnings:
    """Collects one node's warnings during one execution: each goes to the log and onto the node."""

    def __init__(self, node_name: str, node_id: str | None) -> None:
        self.node_name, self.node_id = node_name, node_id
        self.messages: list[str] = []

    def warn(self, message: str) -> None:
        log.warning("%s: %s", self.node_name, message)
        self.messages.append(message)
        self._show(self._warning_lines())

    def show_result(self, text: str) -> None:
        """Show the node's result on it, under the warnings given so far (the frontend keeps one text per node)."""
        self._show("\n\n".join(part for part in (self._warning_lines(), text) if part))

    def _warning_lines(self) -> str:
        return "\n".join(f"Warning: {m}" for m in self.messages)

    def _show(self, text: str) -> None:
        if self.node_id is None:  # called directly (tests, scripts): the log is the only place
            return
        # ComfyUI's server module, only if this process runs it: scripts and tests that drive ComfyUI
        # without its web server have no client to show the text to.
        server = sys.modules.get("server")
        instance = getattr(getattr(server, "PromptServer", None), "instance", None)
        if instance is None:
            return
        # The client that queued the prompt; None (broadcast) when it gave none, as stock nodes do.
        instance.send_progress_text(text, self.node_id, getattr(instance, "client_id", None))
