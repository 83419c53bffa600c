"""Low-rank personalized residuals ΔW = A·B (paper §3.2).

A residual targets one layer with weight W of shape (m, n) (Linear) or (m, n, 1, 1) (1×1 conv).
A ∈ R^{m×r} ("up"), B ∈ R^{r×n} ("down"); the rank comes from the family (perres_core.families): the paper's
r = max(1, round(ratio·m)) with ratio 0.05 (§4.1) on UNets, the paper's share of the model on DiTs.
"""
from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field, replace
from typing import Iterator, Literal, Mapping, Optional

import torch
from torch import nn

from .errors import PerResError
from .families import PAPER_RANK_RATIO, ModelFamily, family_named, rank_for, require_same_family
from .layer_delta import ConvGeometry, low_rank

DEFAULT_RANK_RATIO = PAPER_RANK_RATIO
# Both factors are drawn from N(0, INIT_STD²) by default ("each of the low-rank matrices are randomly
# initialized", §4.1). 1e-2 keeps the initial ΔW about a hundred times smaller than SD's proj_out weights.
INIT_STD = 1e-2

InitMode = Literal["random", "zero"]


def training_date() -> str:
    """Today's ISO date: a residual set records the day its training run began (the file's modelspec.date)."""
    return datetime.date.today().isoformat()


class LowRankResidual(nn.Module):
    """ΔW = A·B for one Linear or 1×1 conv layer, applied to that layer's input."""

    def __init__(self, out_features: int, in_features: int, rank: int, conv: bool = True) -> None:
        super().__init__()
        if rank < 1 or rank > min(out_features, in_features):
            raise PerResError(f"rank {rank} does not fit a {out_features}×{in_features} layer.")
        self.conv = conv
        self.up = nn.Parameter(torch.zeros(out_features, rank))   # A
        self.down = nn.Parameter(torch.zeros(rank, in_features))  # B

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    def initialize(self, mode: InitMode = "random", generator: torch.Generator | None = None,
                   std: float = INIT_STD) -> None:
        """Random N(0, std²) for both factors (paper), or A = 0 so that ΔW starts exactly at zero."""
        with torch.no_grad():
            if mode == "zero":
                # A = 0 gives ΔW = 0 exactly; B must then be non-zero or no gradient would reach A.
                self.down.copy_(torch.randn(self.down.shape, generator=generator) / math.sqrt(self.in_features))
                self.up.zero_()
            else:
                self.down.copy_(torch.randn(self.down.shape, generator=generator) * std)
                self.up.copy_(torch.randn(self.up.shape, generator=generator) * std)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = A·B with the layer's weight shape ((m, n) or (m, n, 1, 1)), in fp32."""
        delta = self.up.float() @ self.down.float()
        return delta[..., None, None] if self.conv else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW·x for the layer input x."""
        return apply_low_rank(x, self.up, self.down, self.conv)


def apply_low_rank(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, conv: bool,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """A·(B·x), or M⊙(A·(B·x)) with a per-location mask, computed in x's dtype.

    Two thin products are cheaper than forming ΔW when r ≪ m, and a mask that is constant over channels
    commutes with the 1×1 A, so it is applied to the r-channel intermediate (the cheapest place).
    """
    up, down = up.to(x.device, x.dtype), down.to(x.device, x.dtype)
    if conv:
        return low_rank(x, up[..., None, None], down[..., None, None], ConvGeometry(), mask)
    return low_rank(x, up, down, None, mask)


@dataclass(frozen=True)
class ConceptInfo:
    """How the concept is named in prompts: 'a photo of a {identifier} {class_word}'."""

    identifier: str = "sks"
    class_word: str = "dog"
    caption_template: str = "a photo of a {identifier} {class_word}"

    def caption(self) -> str:
        return self.caption_template.format(identifier=self.identifier, class_word=self.class_word)

    def concept_words(self) -> list[str]:
        return [self.identifier, self.class_word]


@dataclass
class ResidualSet:
    """The residuals of one concept, keyed by the host's layer path (e.g. 'input_blocks.1.1.proj_out')."""

    layers: dict[str, LowRankResidual]
    concept: ConceptInfo = field(default_factory=ConceptInfo)
    base_model: str = "SD1.x"
    rank_ratio: float = DEFAULT_RANK_RATIO
    training: dict[str, str] = field(default_factory=dict)  # steps, seed, lr, ... for the file metadata
    # ISO date of the training run ("" if unknown). It comes from the run, not from the save, so that
    # re-saving a loaded file keeps its date and one seed still gives byte-identical files.
    date: str = ""

    @classmethod
    def create(cls, layer_shapes: dict[str, tuple[int, int]], rank_ratio: float = DEFAULT_RANK_RATIO,
               conv: bool = True, concept: ConceptInfo | None = None, fixed_rank: int | None = None,
               **kwargs) -> "ResidualSet":
        """One residual per layer; layer_shapes maps a layer path to (out_features, in_features)."""
        layers = {}
        for path, (out_f, in_f) in layer_shapes.items():
            rank = fixed_rank if fixed_rank is not None else rank_for(out_f, rank_ratio)
            layers[path] = LowRankResidual(out_f, in_f, rank, conv=conv)
        kwargs.setdefault("date", training_date())
        return cls(layers=layers, concept=concept or ConceptInfo(), rank_ratio=rank_ratio, **kwargs)

    @classmethod
    def for_family(cls, family: ModelFamily, rank_ratio: float = DEFAULT_RANK_RATIO,
                   unet_config: Optional[Mapping[str, object]] = None, concept: ConceptInfo | None = None,
                   **kwargs) -> "ResidualSet":
        """One residual per residual layer of `family` (Linear or 1×1 conv, as the family's layers are), at the
        family's rank; a DiT's depth comes from the loaded model's unet_config (the released depth without one)."""
        layers = {layer.path: LowRankResidual(layer.out_features, layer.in_features, family.rank(layer, rank_ratio),
                                              conv=layer.conv)
                  for layer in family.residual_layers(unet_config)}
        kwargs.setdefault("date", training_date())
        return cls(layers=layers, concept=concept or ConceptInfo(), rank_ratio=rank_ratio, base_model=family.name,
                   **kwargs)

    def initialize(self, mode: InitMode = "random", seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        for path in sorted(self.layers):
            self.layers[path].initialize(mode, generator)

    def parameters(self) -> Iterator[nn.Parameter]:
        for path in sorted(self.layers):
            yield from self.layers[path].parameters()

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def with_concept(self, concept: ConceptInfo) -> "ResidualSet":
        return replace(self, concept=concept)

    def detached_copy(self) -> "ResidualSet":
        """A copy whose tensors are plain fp32 CPU tensors without autograd history."""
        layers = {}
        for path, layer in self.layers.items():
            copy = LowRankResidual(layer.out_features, layer.in_features, layer.rank, conv=layer.conv)
            with torch.no_grad():
                copy.up.copy_(layer.up.detach().float().cpu())
                copy.down.copy_(layer.down.detach().float().cpu())
            copy.requires_grad_(False)
            layers[path] = copy
        return replace(self, layers=layers, training=dict(self.training))


def check_continuable(initial: ResidualSet, fresh: ResidualSet) -> None:
    """Refuse to continue `initial` as `fresh` (the set this run would create) unless both have the same
    layers, shapes and ranks; the error names the first layer that differs and what to do."""
    restart = "or disconnect initial_residuals to train a new residual"
    require_same_family(initial.base_model, family_of(fresh), "initial_residuals")
    for path in sorted(set(initial.layers) | set(fresh.layers)):
        old, new = initial.layers.get(path), fresh.layers.get(path)
        if old is None or new is None:
            where = "lack" if old is None else "have the extra"
            raise PerResError(f"initial_residuals {where} layer {path}, so they do not fit this {fresh.base_model} "
                              "model; "
                              f"load a residual trained by PerRes Train Residuals, {restart}.")
        if (old.out_features, old.in_features, old.conv) != (new.out_features, new.in_features, new.conv):
            raise PerResError(f"initial_residuals layer {path} is {old.out_features}×{old.in_features}, this model's "
                              f"is {new.out_features}×{new.in_features}; the residual was made for another model. "
                              f"Load one trained on an {fresh.base_model} model, {restart}.")
        if old.rank != new.rank:
            raise PerResError(f"initial_residuals layer {path} has rank {old.rank}, but rank_ratio "
                              f"{fresh.rank_ratio:g} gives rank {new.rank}. Set rank_ratio to the residual's "
                              f"{initial.rank_ratio:g}, {restart}.")


def family_of(residuals: ResidualSet) -> ModelFamily:
    """The model family a residual set was trained on (its base_model)."""
    return family_named(residuals.base_model)


def steps_trained(residuals: ResidualSet) -> Optional[int]:
    """The optimizer steps recorded in the residual's training metadata (all runs), or None if unknown."""
    try:
        steps = int(residuals.training.get("steps", ""))
    except (TypeError, ValueError):
        return None
    return steps if steps >= 0 else None
