"""What a training run shows while it learns: a preview that changes only as the residual does, the loss
smoothed, and the time left.

The preview is the model's x̂₀ of one fixed reference latent, noised at one fixed timestep with one fixed
noise (all chosen once per run from its seed). Nothing in that picture changes from one preview to the next
except the residual, so successive previews are comparable: the base model's x̂₀ of the noised image is a
generic blur of the layout, and as the concept is learned the residual turns it into the reference. A
random training batch, or a fresh sample each time, would change with the draw, not with what was learned.

The timestep sits at 60 % of the schedule (t = 599 of SD's 1000, ᾱ ≈ 0.16, mostly noise): at small t the
noisy image already holds the answer and every preview looks like the reference; near the end of the
schedule only the caption is left and the preview is a sample, not a reconstruction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .diffusion import Conditioning, Schedule
from .training import LatentBucket, PredictFn

PREVIEW_TIMESTEP_SHARE = 0.6
LOSS_SMOOTHING = 0.9  # an exponential moving average over about the last 10 steps
DEFAULT_PREVIEW_EVERY = 10  # one batch-1 forward pass per 10 steps (docs/benchmarks.md has its cost)


@dataclass(frozen=True)
class PreviewSample:
    """One reference latent (1, C, h, w), its noise, the timestep and the caption the preview denoises."""

    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    conditioning: Conditioning

    @classmethod
    def of(cls, buckets: Sequence[LatentBucket], schedule: Schedule, seed: int) -> "PreviewSample":
        """The first reference image (of the first bucket), with noise of its own generator: the training
        draws are the same with and without previews."""
        bucket = buckets[0]
        x0 = bucket.latents[:1].float()
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        t = torch.tensor([round(PREVIEW_TIMESTEP_SHARE * (schedule.num_timesteps - 1))])
        return cls(x0, noise, t, bucket.conditioning.select(torch.tensor([0])))

    @torch.no_grad()
    def denoise(self, predict: PredictFn, schedule: Schedule, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The model's x̂₀ (1, C, h, w) of this sample, in float on `device`."""
        x_t = schedule.noisy(self.x0, self.noise, self.t)
        output = predict(x_t.to(device, dtype), self.t.to(device), self.conditioning.to(device, dtype))
        return schedule.denoised(output.float(), x_t.to(device), self.t)


class SmoothedLoss:
    """An exponential moving average of the loss, bias-corrected so the first steps are not pulled to 0."""

    def __init__(self, smoothing: float = LOSS_SMOOTHING) -> None:
        self.smoothing, self.average, self.count = smoothing, 0.0, 0

    def add(self, loss: float) -> float:
        self.count += 1
        self.average = self.smoothing * self.average + (1 - self.smoothing) * loss
        return self.average / (1 - self.smoothing ** self.count)


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_line(step: int, total: int, smoothed_loss: float, elapsed: float,
                  first_step: int = 0, last_snapshot: Optional[str] = None) -> str:
    """The node's line of text after `step` (1-based) of `total` steps in this run; first_step: steps the
    residual had before (a continued run)."""
    left = elapsed / step * (total - step) if step else math.nan
    line = (f"step {first_step + step}/{first_step + total} · loss {smoothed_loss:.4f} (smoothed) · "
            f"{duration(left) + ' left' if step < total else 'done in ' + duration(elapsed)}")
    return line if last_snapshot is None else f"{line}\nlast snapshot: {last_snapshot}"
