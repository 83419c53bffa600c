"""What PerRes Train Residuals shows and keeps while it trains: the progress bar with a preview image, a line
of text with the step, the smoothed loss and the time left, and snapshots of the residual every N steps.

The preview goes through the host's own mechanism, as KSampler's do: comfy.utils.ProgressBar with a preview
image from latent_preview's previewer (TAESD when models/vae_approx has the family's decoder and the user
chose it, else the latent-to-RGB approximation, nothing with previews off; ComfyUI ≥ 0.3.7x also takes the
method per prompt). The server sends it to the client that queued the prompt: the frontend shows it on the
node, an API client receives the same websocket messages. What the preview shows: perres_core.preview.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable, Optional

import torch


from .host.entry_points import comfy, latent_preview  # the host's modules, imported and checked in one place
from ..perres_core.preview import SmoothedLoss, progress_line
from ..perres_core.residual import ResidualSet
from .file_nodes import checked_prefix, save_to_loras
from .node_warnings import NodeWarnings

log = logging.getLogger("perres")
TEXT_INTERVAL_S = 0.5  # at most two text updates a second on fast GPUs (each is a websocket message)


class TrainingMonitor:
    """The on_step of one training run (nodes.host.training.TrainingStepCallback)."""

    def __init__(self, model, residuals: ResidualSet, steps: int, first_step: int, preview_every: int,
                 snapshot_every: int, snapshot_prefix: str, warnings: NodeWarnings) -> None:
        self.residuals, self.steps, self.first_step = residuals, steps, first_step
        self.preview_every, self.snapshot_every = preview_every, snapshot_every
        if snapshot_every:  # refuse a bad prefix before training, not at the first snapshot
            checked_prefix(snapshot_prefix, "snapshot_prefix")
        self.snapshot_prefix = snapshot_prefix
        self.warnings = warnings
        # None when the user turned previews off (--preview-method none, or per prompt on newer hosts)
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format) \
            if preview_every else None
        self.progress = comfy.utils.ProgressBar(steps)
        self.loss = SmoothedLoss()
        self.started = time.monotonic()
        self.text_sent = -TEXT_INTERVAL_S
        self.snapshots: list[ResidualSet] = []
        self.snapshot_files: list[str] = []
        self.previews = 0

    def __call__(self, step: int, loss: float, denoise: Callable[[], torch.Tensor]) -> None:
        done = step + 1
        smoothed = self.loss.add(loss)
        preview = None
        if self.previewer is not None and (done == 1 or done % self.preview_every == 0 or done == self.steps):
            x0 = denoise()
            with torch.no_grad():  # the previewer (TAESD) may have been built in inference mode
                preview = self.previewer.decode_latent_to_preview_image("JPEG", x0)
            self.previews += 1
        if self.snapshot_every and done % self.snapshot_every == 0:
            self.snapshot(done)
        self.progress.update_absolute(done, self.steps, preview)
        now = time.monotonic()
        if now - self.text_sent >= TEXT_INTERVAL_S or done == self.steps or preview is not None:
            self.text_sent = now
            self.warnings.show_result(progress_line(done, self.steps, smoothed, now - self.started, self.first_step,
                                                    self.snapshot_files[-1] if self.snapshot_files else None))
        comfy.model_management.throw_exception_if_processing_interrupted()

    def snapshot(self, done: int) -> None:
        """Write the residual as it is after `done` steps of this run: a new file (never overwriting), the step
        in its name and in its metadata."""
        total = self.first_step + done
        snapshot = self.residuals.detached_copy()
        snapshot = replace(snapshot, training={**snapshot.training, "steps": total, "snapshot_of_steps":
                                               self.first_step + self.steps})
        self.snapshot_files.append(save_to_loras(snapshot, f"{self.snapshot_prefix}_step{total:05d}"))
        self.snapshots.append(snapshot)
        log.info("snapshot after step %d: models/loras/%s", total, self.snapshot_files[-1])

    def kept_snapshots(self) -> Optional[str]:
        """For messages after a cancel or an error: which snapshots are on disk, or None without any."""
        if not self.snapshot_files:
            return None
        names = ", ".join(f"models/loras/{name}" for name in self.snapshot_files)
        return f"the {len(self.snapshot_files)} snapshot(s) written before it are kept: {names}"

    def output_list(self, final: ResidualSet) -> list[ResidualSet]:
        """The snapshots, then the final residual unless the last snapshot is of the final step: the list a
        workflow fans out to sample every stage with the same seed."""
        if self.snapshots and self.snapshots[-1].training.get("steps") == final.training.get("steps"):
            return [*self.snapshots[:-1], final]
        return [*self.snapshots, final]
