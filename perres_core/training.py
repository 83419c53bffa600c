"""Training loop for personalized residuals with the plain diffusion loss (paper Eq. 1).

The loop knows nothing about the host: it receives the UNet as a function of (x_t, t, conditioning)
whose only trainable parameters are the residuals, the clean latents, the caption conditioning and the
model's schedule (ᾱ_t and what the UNet predicts). The loss is ‖target − output‖² in the model's own
prediction space: ε for ε-prediction models (Eq. 1), v for v-prediction ones (NoobAI-style SDXL), the
target each model was trained with. All randomness comes from one seeded CPU generator, so the same seed
and inputs give the same residuals on the CPU, whatever device runs the model.

Optional per-location loss weights (from subject masks) turn the loss into a weighted mean; weights of 1
everywhere are exactly the paper's loss.

The training latents come in buckets (perres_core.buckets): one tensor per training size. Each step draws
its batch from one bucket, chosen in proportion to the bucket's images; with a single bucket no bucket is
drawn, so the draws are those of one plain tensor of latents.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .diffusion import Conditioning, Schedule
from .errors import PerResError

# The UNet's raw output (ε̂ or v̂, as its Schedule says) for x_t, the discrete timesteps t and one
# conditioning row per sample.
PredictFn = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]
ScheduleLike = Union[Schedule, torch.Tensor]      # a bare ᾱ_t tensor means ε-prediction
ConditioningLike = Union[Conditioning, torch.Tensor]  # bare caption tokens mean no vector (SD1.x)
StepCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class TrainSettings:
    """Paper defaults (§4.1): 150 steps, batch 4, lr 1e-3 (AdamW)."""

    steps: int = 150
    batch_size: int = 4
    learning_rate: float = 1e-3
    seed: int = 0
    weight_decay: float = 1e-2  # torch's AdamW default; the paper does not state one
    # Steps already done by the residual being continued. Their random draws are skipped, so a continuation
    # draws the batches, timesteps and noise that one long run with this seed would draw from that step on.
    start_step: int = 0

    def validate(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise PerResError(f"steps must be at least 1, got {self.steps}. The paper trains 150 steps.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise PerResError(f"batch_size must be at least 1, got {self.batch_size}. The paper uses 4.")
        lr = self.learning_rate
        if not isinstance(lr, (int, float)) or math.isnan(lr) or math.isinf(lr) or lr <= 0:
            raise PerResError(f"learning_rate must be a positive finite number, got {lr}. The paper uses 0.001.")
        if not isinstance(self.start_step, int) or self.start_step < 0:
            raise PerResError(f"start_step must be 0 or more, got {self.start_step}.")


class TrainingDiverged(PerResError):
    """The loss became NaN or Inf; nothing from the run may be kept."""


@dataclass(frozen=True)
class LatentBucket:
    """The training latents of one size with what they are conditioned on.

    latents: clean latents, already scaled as the UNet expects (n, C, h, w), on the CPU.
    conditioning: one row per latent or a single row for all (SDXL's vector carries the bucket's size).
    weights: optional loss weights (n, 1, h, w) from loss_weights(), one per latent.
    """

    latents: torch.Tensor
    conditioning: Conditioning
    weights: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "conditioning", Conditioning.of(self.conditioning))
        latents, weights = self.latents, self.weights
        if latents.shape[0] < 1:
            raise PerResError("No training latents were given.")
        if len(self.conditioning) not in (1, latents.shape[0]):
            raise PerResError(f"{len(self.conditioning)} captions for {latents.shape[0]} images; give one caption "
                              "or one per image.")
        if weights is not None and (weights.shape[0] != latents.shape[0] or weights.shape[2:] != latents.shape[2:]):
            raise PerResError(f"loss weights of shape {tuple(weights.shape)} do not fit latents of shape "
                              f"{tuple(latents.shape)}; give one mask per image.")

    def __len__(self) -> int:
        return self.latents.shape[0]


def draw_batch(num_items: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of one batch: without replacement when there are enough images, else with."""
    if batch_size <= num_items:
        return torch.randperm(num_items, generator=generator)[:batch_size]
    return torch.randint(0, num_items, (batch_size,), generator=generator)


def draw_step(num_items: int, batch_size: int, latent_shape: tuple[int, ...], num_timesteps: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's random draws, in this order: image indices, timesteps t, noise ε (batch, *latent_shape)."""
    index = draw_batch(num_items, batch_size, generator)
    t = torch.randint(0, num_timesteps, (len(index),), generator=generator)
    noise = torch.randn((len(index), *latent_shape), generator=generator)
    return index, t, noise


def draw_bucket(buckets: Sequence[LatentBucket], generator: torch.Generator) -> int:
    """The bucket of one step, in proportion to its images (no draw at all for a single bucket)."""
    if len(buckets) == 1:
        return 0
    sizes = torch.tensor([float(len(bucket)) for bucket in buckets])
    return int(torch.multinomial(sizes, 1, generator=generator).item())


def loss_weights(masks: torch.Tensor, latent_size: tuple[int, int], background_weight: float) -> Optional[torch.Tensor]:
    """Subject masks (N, S, S) at the training resolution → loss weights (N, 1, h, w) on the latent grid.

    A latent location's weight is background_weight + (1 − background_weight)·c, with c the share of its
    pixels the mask covers (area average). None when every weight is 1: that is the paper's plain loss.
    """
    if not isinstance(background_weight, (int, float)) or not 0.0 <= background_weight <= 1.0:
        raise PerResError(f"background_weight must be between 0 and 1, got {background_weight}. 0 ignores the "
                          "background, 1 weights it like the subject (the paper's plain loss).")
    cover = F.interpolate(masks.float().unsqueeze(1), size=tuple(latent_size), mode="area")
    for number, share in enumerate(cover.sum(dim=(1, 2, 3)).tolist(), start=1):
        if share < 1.0:  # less than one latent cell (8×8 pixels) of subject
            raise PerResError(f"mask {number} marks (almost) no pixel as the subject. The masks must be 1 on the "
                              "concept and 0 on the background; if yours mark the background (as the stock Load "
                              "Image's mask of a cut-out does), turn on invert_masks.")
    weights = background_weight + (1.0 - background_weight) * cover
    return None if bool((weights == 1.0).all()) else weights


def prediction_loss(prediction: torch.Tensor, target: torch.Tensor,
                    weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """‖target − prediction‖² averaged over the batch (paper Eq. 1, with target ε or v), or its mean weighted
    per location by `weights` (B, 1, h, w); a location of weight 0 contributes neither loss nor gradient."""
    if weights is None:
        return F.mse_loss(prediction, target)
    weights = weights.to(prediction.device, prediction.dtype)
    return ((prediction - target).square() * weights).sum() / (weights.sum() * prediction.shape[1])


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: ScheduleLike) -> torch.Tensor:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (DDPM forward process)."""
    return Schedule.of(schedule).noisy(x0, noise, t)


def model_output(predict: PredictFn, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                 conditioning: Conditioning, schedule: Schedule, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(the UNet's output, x_t) for x_t noised from x0 at t (inputs on the CPU); computed on `device` in `dtype`."""
    x_t = noisy_latents(x0, noise, t, schedule)
    return predict(x_t.to(device, dtype), t.to(device), conditioning.to(device, dtype)), x_t


def predicted_noise(predict: PredictFn, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                    conditioning: ConditioningLike, schedule: ScheduleLike, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ε̂(x_t, t, c) for x_t noised from x0 at t, whatever the model predicts (a v̂ is turned into ε̂)."""
    schedule = Schedule.of(schedule)
    output, x_t = model_output(predict, x0, noise, t, Conditioning.of(conditioning), schedule, device, dtype)
    return schedule.noise_from(output, x_t, t)


def train_residuals(predict: PredictFn, buckets: Sequence[LatentBucket], schedule: ScheduleLike,
                    parameters: Iterable[torch.nn.Parameter], settings: TrainSettings,
                    on_step: Optional[StepCallback] = None, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32,
                    grad_scaler: Optional["torch.amp.GradScaler"] = None) -> list[float]:
    """Minimise E‖target − f_θ(x_t, t, c)‖² over the residual parameters only; returns the loss per step.

    buckets: the training latents, one LatentBucket per image size, each with its conditioning and optional loss
    weights (one bucket when every image has the same size).
    schedule: the model's ᾱ_t and prediction type.
    on_step(step, loss) runs after every optimiser step; it may raise to cancel.
    """
    settings.validate()
    buckets = list(buckets)
    if not buckets:
        raise PerResError("No training latents were given.")
    schedule = Schedule.of(schedule)
    params = list(parameters)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)

    def draw() -> tuple[LatentBucket, torch.Tensor, torch.Tensor, torch.Tensor]:
        bucket = buckets[draw_bucket(buckets, generator)]
        index, t, noise = draw_step(len(bucket), settings.batch_size, tuple(bucket.latents.shape[1:]),
                                    schedule.num_timesteps, generator)
        return bucket, index, t, noise

    for _ in range(settings.start_step):
        draw()
    losses: list[float] = []
    for step in range(settings.steps):
        bucket, index, t, noise = draw()
        x0 = bucket.latents[index].float()
        output, _ = model_output(predict, x0, noise, t, bucket.conditioning.select(index), schedule, device, dtype)
        target = schedule.target(x0, noise, t).to(device)
        loss = prediction_loss(output.float(), target, None if bucket.weights is None else bucket.weights[index])
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(f"The loss became {value} at step {step + 1}; training stopped and nothing "
                                   "was saved. Lower the learning rate (the paper uses 0.001) or check the model.")
        optimizer.zero_grad(set_to_none=True)
        if grad_scaler is not None:
            grad_scaler.scale(loss).backward()
            grad_scaler.step(optimizer)
            grad_scaler.update()
        else:
            loss.backward()
            optimizer.step()
        losses.append(value)
        if on_step is not None:
            on_step(step, value)
    for param in params:
        if not torch.isfinite(param).all():
            raise TrainingDiverged("The residuals contain NaN or Inf after training; nothing was saved. "
                                   "Lower the learning rate.")
    return losses


def epsilon_errors(predict: PredictFn, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   conditioning: ConditioningLike, schedule: ScheduleLike, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ε-MSE of Eq. 1 for each sample of a batch (N,), on `device`: x0, noise, t and conditioning on the
    CPU. A v-prediction model's output is turned into ε̂ first, so every model is judged by the same error."""
    prediction = predicted_noise(predict, x0, noise, t, conditioning, schedule, device, dtype)
    return (prediction.float() - noise.to(device)).pow(2).flatten(1).mean(1)


@torch.no_grad()
def evaluation_loss(predict: PredictFn, latents: torch.Tensor, conditioning: ConditioningLike,
                    schedule: ScheduleLike, timesteps: torch.Tensor, seed: int,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    weights: Optional[torch.Tensor] = None) -> float:
    """The training loss (ε or v target, as the schedule says) over every latent at each of the given fixed
    timesteps, with seeded noise; with `weights` (N, 1, h, w) the weighted mean that masked training minimises."""
    conditioning, schedule = Conditioning.of(conditioning), Schedule.of(schedule)
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    rows = torch.arange(latents.shape[0])
    for t_value in timesteps.tolist():
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.full((latents.shape[0],), int(t_value), dtype=torch.long)
        x0 = latents.float()
        output, _ = model_output(predict, x0, noise, t, conditioning.select(rows), schedule, device, dtype)
        target = schedule.target(x0, noise, t).to(device)
        if weights is None:
            total += F.mse_loss(output.float(), target, reduction="sum").item()
            count += noise.numel()
        else:
            total += prediction_loss(output.float(), target, weights).item()
            count += 1
    return total / count
