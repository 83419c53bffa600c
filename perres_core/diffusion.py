"""What a denoiser is conditioned on, and the noise schedule it was trained with.

SD1.x conditions on the caption's tokens alone; SDXL also on a vector y (the pooled CLIP-G embedding and the
size/crop embeddings); DiTs on what the host's own extra_conds makes of the text encoder's output (Anima: the
LLM adapter's output over the T5 ids; Krea 2: the tapped Qwen3-VL layers). Some SDXL descendants (NoobAI v-pred)
predict v = √ᾱ·ε − √(1−ᾱ)·x0 instead of ε, some with a zero-terminal-SNR schedule: plain DDPM quantities,
x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε. The DiTs are rectified-flow models: x_t = (1−σ_t)·x0 + σ_t·ε, and they predict the
velocity ε − x0 (ComfyUI's CONST sampling: x̂0 = x_t − σ_t·v̂). The levels ᾱ_t or σ_t come from the host's
model_sampling, its shift included, so drawing t uniformly draws the noise levels the model was trained on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Optional, Sequence, Union

import torch

from .errors import PerResError

Prediction = Literal["epsilon", "v", "flow"]
PREDICTIONS: tuple[str, ...] = ("epsilon", "v", "flow")


@dataclass(frozen=True)
class Conditioning:
    """One row per caption: the text tokens (N, T, D), for SDXL the vector y (N, V), and any other input the
    host's extra_conds gives the denoiser, by its keyword (each (N, ...))."""

    context: torch.Tensor
    vector: Optional[torch.Tensor] = None
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, rows in (("conditioning vectors", self.vector), *self.extras.items()):
            if rows is not None and rows.shape[0] != self.context.shape[0]:
                raise PerResError(f"{rows.shape[0]} {name} for {self.context.shape[0]} captions.")

    @classmethod
    def of(cls, value: Union["Conditioning", torch.Tensor]) -> "Conditioning":
        """A Conditioning as it is, or one made of bare caption tokens (SD1.x)."""
        return value if isinstance(value, Conditioning) else cls(value)

    @classmethod
    def cat(cls, rows: Sequence["Conditioning"]) -> "Conditioning":
        vectors = [row.vector for row in rows]
        if any(v is None for v in vectors) and not all(v is None for v in vectors):
            raise PerResError("some captions have a conditioning vector and some do not.")
        if any(row.extras.keys() != rows[0].extras.keys() for row in rows):
            raise PerResError("the captions were encoded by different text encoders.")
        return cls(torch.cat([row.context for row in rows]), None if vectors[0] is None else torch.cat(vectors),
                   {name: torch.cat([row.extras[name] for row in rows]) for name in rows[0].extras})

    def __len__(self) -> int:
        return self.context.shape[0]

    def _map(self, change: Callable[[torch.Tensor], torch.Tensor]) -> "Conditioning":
        return Conditioning(change(self.context), None if self.vector is None else change(self.vector),
                            {name: change(rows) for name, rows in self.extras.items()})

    def select(self, index: torch.Tensor) -> "Conditioning":
        """The rows at `index`; a single caption serves every index."""
        if len(self) == 1:
            n = len(index)
            return self._map(lambda rows: rows.expand(n, *rows.shape[1:]))
        return self._map(lambda rows: rows[index])

    def to(self, device: Union[torch.device, str], dtype: Optional[torch.dtype] = None) -> "Conditioning":
        """On `device`; floating-point rows in `dtype` (token ids keep theirs)."""
        return self._map(lambda rows: rows.to(device, dtype) if dtype and rows.is_floating_point()
                         else rows.to(device))

    def cpu_float(self) -> "Conditioning":
        """A CPU copy without autograd history (nor inference-mode flags), floating-point rows in fp32."""
        return self._map(lambda rows: rows.detach().clone().cpu().float() if rows.is_floating_point()
                         else rows.detach().clone().cpu())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword inputs of the denoiser besides x, t and context: y (SDXL) and the extras."""
        return {**({} if self.vector is None else {"y": self.vector}), **self.extras}


@dataclass(frozen=True)
class Schedule:
    """The noise levels of the model's schedule (T,) on the CPU (ᾱ_t for ε and v prediction, σ_t for flow), and
    what the denoiser predicts at x_t."""

    levels: torch.Tensor
    prediction: Prediction = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise PerResError(f"unknown prediction type '{self.prediction}'; PerRes trains {', '.join(PREDICTIONS)}.")

    @classmethod
    def of(cls, value: Union["Schedule", torch.Tensor]) -> "Schedule":
        """A Schedule as it is, or an ε-prediction one from bare ᾱ_t."""
        return value if isinstance(value, Schedule) else cls(value.float().cpu())

    @property
    def is_flow(self) -> bool:
        return self.prediction == "flow"

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t of a DDPM schedule."""
        if self.is_flow:
            raise PerResError("a rectified-flow schedule has noise levels σ_t, not ᾱ_t.")
        return self.levels

    @property
    def num_timesteps(self) -> int:
        return self.levels.shape[0]

    def _level(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.levels.float()[t.cpu()].to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (DDPM forward process), or (1−σ_t)·x0 + σ_t·ε (rectified flow)."""
        level = self._level(t, x0)
        if self.is_flow:
            return (1 - level) * x0 + level * noise
        return level.sqrt() * x0 + (1 - level).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser learns to predict: ε (paper Eq. 1), v = √ᾱ_t·ε − √(1−ᾱ_t)·x0, or the flow's
        velocity ε − x0."""
        if self.prediction == "epsilon":
            return noise
        if self.is_flow:
            return noise - x0
        abar = self._level(t, x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def noise_from(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε̂ from the denoiser's output at x_t: the output itself, √ᾱ_t·v̂ + √(1−ᾱ_t)·x_t, or x_t + (1−σ_t)·v̂."""
        if self.prediction == "epsilon":
            return output
        level = self._level(t, output)
        x_t = x_t.to(output.device, output.dtype)
        if self.is_flow:
            return x_t + (1 - level) * output
        return level.sqrt() * output + (1 - level).sqrt() * x_t

    def denoised(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x̂₀: the clean latent the denoiser's output at x_t points to: (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t, or x_t − σ_t·v̂."""
        if self.is_flow:
            return x_t.to(output.device, output.dtype) - self._level(t, output) * output
        noise = self.noise_from(output, x_t, t)
        abar = self._level(t, noise)
        return (x_t.to(noise.device, noise.dtype) - (1 - abar).sqrt() * noise) / abar.sqrt().clamp_min(1e-4)
