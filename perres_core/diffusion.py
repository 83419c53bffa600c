"""What a UNet is conditioned on, and the discrete diffusion schedule it was trained with.

SD1.x conditions on the caption's tokens alone; SDXL also on a vector y (the pooled CLIP-G embedding and the
size/crop embeddings), which the host builds from the conditioning. Some SDXL descendants (NoobAI v-pred)
predict v = √ᾱ·ε − √(1−ᾱ)·x0 instead of ε, some with a zero-terminal-SNR schedule. Both stay plain DDPM
quantities here: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, with ᾱ_t from the host's model_sampling.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch

from .errors import PerResError

Prediction = Literal["epsilon", "v"]
PREDICTIONS: tuple[str, ...] = ("epsilon", "v")


@dataclass(frozen=True)
class Conditioning:
    """One row per caption: cross-attention tokens (N, T, D) and, for SDXL, the vector y (N, V)."""

    context: torch.Tensor
    vector: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.vector is not None and self.vector.shape[0] != self.context.shape[0]:
            raise PerResError(f"{self.vector.shape[0]} conditioning vectors for {self.context.shape[0]} captions.")

    @classmethod
    def of(cls, value: Union["Conditioning", torch.Tensor]) -> "Conditioning":
        """A Conditioning as it is, or one made of bare caption tokens (SD1.x)."""
        return value if isinstance(value, Conditioning) else cls(value)

    @classmethod
    def cat(cls, rows: Sequence["Conditioning"]) -> "Conditioning":
        vectors = [row.vector for row in rows]
        if any(v is None for v in vectors) and not all(v is None for v in vectors):
            raise PerResError("some captions have a conditioning vector and some do not.")
        return cls(torch.cat([row.context for row in rows]),
                   None if vectors[0] is None else torch.cat(vectors))

    def __len__(self) -> int:
        return self.context.shape[0]

    def select(self, index: torch.Tensor) -> "Conditioning":
        """The rows at `index`; a single caption serves every index."""
        if len(self) == 1:
            n = len(index)
            return Conditioning(self.context.expand(n, *self.context.shape[1:]),
                                None if self.vector is None else self.vector.expand(n, *self.vector.shape[1:]))
        return Conditioning(self.context[index], None if self.vector is None else self.vector[index])

    def to(self, device: Union[torch.device, str], dtype: Optional[torch.dtype] = None) -> "Conditioning":
        vector = None if self.vector is None else self.vector.to(device, dtype)
        return Conditioning(self.context.to(device, dtype), vector)

    def cpu_float(self) -> "Conditioning":
        return Conditioning(self.context.detach().clone().float().cpu(),
                            None if self.vector is None else self.vector.detach().clone().float().cpu())


@dataclass(frozen=True)
class Schedule:
    """ᾱ_t of a discrete schedule (T,) on the CPU, and what the UNet predicts at x_t."""

    alphas_cumprod: torch.Tensor
    prediction: Prediction = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise PerResError(f"unknown prediction type '{self.prediction}'; PerRes trains {', '.join(PREDICTIONS)}.")

    @classmethod
    def of(cls, value: Union["Schedule", torch.Tensor]) -> "Schedule":
        """A Schedule as it is, or an ε-prediction one from bare ᾱ_t."""
        return value if isinstance(value, Schedule) else cls(value.float().cpu())

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.float()[t.cpu()].to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (DDPM forward process)."""
        abar = self._abar(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet learns to predict: ε (paper Eq. 1), or v = √ᾱ_t·ε − √(1−ᾱ_t)·x0."""
        if self.prediction == "epsilon":
            return noise
        abar = self._abar(t, x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def noise_from(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε̂ from the UNet's output at x_t: the output itself, or √ᾱ_t·v̂ + √(1−ᾱ_t)·x_t."""
        if self.prediction == "epsilon":
            return output
        abar = self._abar(t, output)
        return abar.sqrt() * output + (1 - abar).sqrt() * x_t.to(output.device, output.dtype)

    def denoised(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x̂₀ = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t: the clean latent the UNet's output at x_t points to."""
        noise = self.noise_from(output, x_t, t)
        abar = self._abar(t, noise)
        return (x_t.to(noise.device, noise.dtype) - (1 - abar).sqrt() * noise) / abar.sqrt().clamp_min(1e-4)
