"""LAG sampling as a ComfyUI model patch (paper §3.3, Eqs. 2-3), for one or several concepts.

Per UNet call a DIFFUSION_MODEL wrapper registers three hooks on each of the 16 transformer blocks,
removed again when the call returns (other clones of the same UNet never see them):
  * attn2.to_q  – keeps the block's own cross-attention queries (no second projection);
  * attn2.to_k  – with those queries, computes A_C for every concept on the positive rows and turns it
                  into a mask (median split by default);
  * proj_out    – adds M·(ΔW·x) per concept, so f̂ = W·x + Σ_k M_k·(ΔW_k·x).
No attn2 replace patch is used, so packs that replace cross-attention (IP-Adapter style) keep working,
and the attention itself is whatever ComfyUI computes. The stock LoraLoader's weight patches on the
same layers compose, because the hooks only add to the layer outputs.

Batches: ComfyUI stacks chunks [uncond…, cond…] (transformer_options["cond_or_uncond"], 1 = negative,
0 = positive), each with the latent batch's rows. Masks come from the positive rows; a negative row
uses the mask of the positive row for the same image, so both CFG branches see the residual in the
same place. When memory is short ComfyUI runs the negative chunk alone, before the positive one; it
then reuses the previous step's positive mask for that block, and at the very first step applies the
residual everywhere (M = 1).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

import comfy.patcher_extension

from ..perres_core.lag import MaskSettings, concept_attention, concept_columns, concept_masks
from ..perres_core.residual import ResidualSet, apply_low_rank
from ..perres_core.sd15_layout import TransformerSlot
from .host_model import transformer_modules

log = logging.getLogger("perres")
WRAPPER_KEY = "perres_lag"
POSITIVE, NEGATIVE = 0, 1


@dataclass
class LagConcept:
    """One residual and where its concept words sit in the prompt's tokens."""

    residuals: ResidualSet
    positions: list[int]
    strength: float = 1.0
    label: str = ""


@dataclass
class _CallState:
    """Everything one UNet call shares between its hooks."""

    positive_rows: list[int]
    pair_of_row: list[int]          # for each row, the positive row whose mask it uses (or -1)
    active: bool
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    masks: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # slot -> per concept (B_total, N)
    _selector: object = None
    _gather: Optional[torch.Tensor] = None

    def positive(self, device: torch.device):
        """Selects the positive rows: a slice (a view, no copy) when they are contiguous, as in ComfyUI's
        [uncond…, cond…] layout, else an index tensor. Built once per call, not once per block."""
        if self._selector is None:
            rows = self.positive_rows
            contiguous = rows == list(range(rows[0], rows[-1] + 1))
            self._selector = slice(rows[0], rows[-1] + 1) if contiguous else torch.tensor(rows, device=device)
        return self._selector

    def partner_index(self, device: torch.device) -> torch.Tensor:
        """For each row of the call, the index of its positive partner among the positive rows."""
        if self._gather is None:
            index = {row: i for i, row in enumerate(self.positive_rows)}
            self._gather = torch.tensor([index[p] for p in self.pair_of_row], device=device)
        return self._gather


class MaskRecorder:
    """Average of the positive masks per block resolution and concept, over the steps of one sampling run."""

    def __init__(self) -> None:
        self.sums: dict[tuple[int, int], torch.Tensor] = {}
        self.counts: dict[tuple[int, int], int] = {}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def add(self, height: int, width: int, masks: list[torch.Tensor], rows) -> None:
        stacked = torch.stack([m[rows].float().mean(dim=0) for m in masks]).reshape(len(masks), height, width)
        key = (height, width)
        # summed on the sampling device: a copy to the CPU here would stall the GPU 16 times per step
        self.sums[key] = self.sums[key] + stacked if key in self.sums else stacked
        self.counts[key] = self.counts.get(key, 0) + 1

    def averages(self) -> dict[tuple[int, int], torch.Tensor]:
        """(K concepts, h, w) average mask per resolution, on the CPU."""
        return {key: (self.sums[key] / self.counts[key]).cpu() for key in self.sums}


class LagPatch:
    """The callable pieces of LAG, held by the patched ModelPatcher's wrappers."""

    def __init__(self, concepts: list[LagConcept], prompt_length: int, settings: MaskSettings,
                 sigma_start: float = float("inf"), sigma_end: float = 0.0, outside: str = "full") -> None:
        settings.validate()
        self.concepts = concepts
        self.prompt_length = prompt_length
        self.settings = settings
        self.sigma_start, self.sigma_end = sigma_start, sigma_end
        self.outside = outside          # "full": W + ΔW outside the LAG steps; "base": W
        self.recorder = MaskRecorder()
        self._last_positive: dict[int, tuple[list[torch.Tensor], object]] = {}
        self._columns: dict[tuple, torch.Tensor] = {}
        self._device_factors: dict[tuple, Optional[tuple]] = {}
        self._warned_length = False

    # --- registration -------------------------------------------------------------------------
    def install(self, patcher) -> None:
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, self.outer_sample)
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, self.diffusion_model)

    @staticmethod
    def of(patcher) -> Optional["LagPatch"]:
        for wrapper in patcher.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY):
            owner = getattr(wrapper, "__self__", None)
            if isinstance(owner, LagPatch):
                return owner
        return None

    # --- wrappers -----------------------------------------------------------------------------
    def outer_sample(self, executor, *args, **kwargs):
        """A new sampling run: forget masks of the previous one."""
        self.recorder.reset()
        self._last_positive.clear()
        return executor(*args, **kwargs)

    def diffusion_model(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        state = self._call_state(x.shape[0], transformer_options)
        unet = executor.class_obj
        handles = []
        try:
            for slot, transformer in transformer_modules(unet):
                attn2 = transformer.transformer_blocks[0].attn2
                if state.active:
                    handles.append(attn2.to_q.register_forward_hook(self._keep_queries(slot, state)))
                    handles.append(attn2.to_k.register_forward_hook(self._make_masks(slot, state, attn2.heads)))
                handles.append(transformer.proj_out.register_forward_hook(self._add_residuals(slot, state)))
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    def _call_state(self, batch: int, transformer_options: dict) -> _CallState:
        chunks = transformer_options.get("cond_or_uncond") or [POSITIVE]
        rows_per_chunk = max(1, batch // len(chunks))
        positive_rows, pair = [], []
        first_positive = next((i for i, c in enumerate(chunks) if c == POSITIVE), None)
        for chunk_index, kind in enumerate(chunks):
            for r in range(rows_per_chunk):
                row = chunk_index * rows_per_chunk + r
                if kind == POSITIVE:
                    positive_rows.append(row)
                    pair.append(row)
                else:
                    pair.append(-1 if first_positive is None else first_positive * rows_per_chunk + r)
        sigmas = transformer_options.get("sigmas")
        active = True
        if sigmas is not None and len(sigmas):
            sigma = float(sigmas.reshape(-1)[0])
            active = self.sigma_end <= sigma <= self.sigma_start
        return _CallState(positive_rows=positive_rows, pair_of_row=pair, active=active)

    # --- hooks --------------------------------------------------------------------------------
    def _keep_queries(self, slot: TransformerSlot, state: _CallState):
        def hook(module, args, output):
            state.queries[slot.index] = output
        return hook

    def _columns_for(self, concept_index: int, context_length: int, device: torch.device) -> torch.Tensor:
        key = (concept_index, context_length, device)
        if key not in self._columns:
            if context_length % self.prompt_length and not self._warned_length:
                self._warned_length = True
                log.warning("PerRes LAG: the positive conditioning has %d tokens but the LAG prompt has %d; wire the "
                            "LAG node's conditioning output to the sampler so the concept tokens line up.",
                            context_length, self.prompt_length)
            positions = self.concepts[concept_index].positions
            self._columns[key] = concept_columns(context_length, positions, self.prompt_length).to(device)
        return self._columns[key]

    def _factors(self, concept_index: int, slot: TransformerSlot, x: torch.Tensor):
        """(strength·A, B) of the concept for this layer on x's device and dtype, cached (the residual itself
        is never moved); None where the concept has no residual for the layer or zero strength."""
        key = (concept_index, slot.index, x.device, x.dtype)
        if key not in self._device_factors:
            concept = self.concepts[concept_index]
            layer = concept.residuals.layers.get(slot.proj_out)
            self._device_factors[key] = None if layer is None or concept.strength == 0 else (
                (layer.up.detach().float() * concept.strength).to(x.device, x.dtype),
                layer.down.detach().to(x.device, x.dtype), layer.conv)
        return self._device_factors[key]

    def _make_masks(self, slot: TransformerSlot, state: _CallState, heads: int):
        def hook(module, args, keys):
            queries = state.queries.pop(slot.index, None)
            if queries is None or not state.positive_rows:
                return None
            positive = state.positive(queries.device)
            q, k = queries[positive], keys[positive]
            located = [c for c, concept in enumerate(self.concepts) if concept.positions]
            maps = [concept_attention(q, k, heads, self._columns_for(c, keys.shape[1], keys.device)) for c in located]
            found = dict(zip(located, concept_masks(maps, self.settings)))   # each (P, N)
            # a concept whose words are not in the prompt falls back to the residual everywhere
            everywhere = torch.ones(q.shape[0], q.shape[1], device=q.device)
            partner = state.partner_index(q.device)
            state.masks[slot.index] = [found.get(c, everywhere).index_select(0, partner)
                                       for c in range(len(self.concepts))]
            return None
        return hook

    def _masks_for(self, slot: TransformerSlot, state: _CallState, batch: int, tokens: int,
                   device: torch.device) -> Optional[list[torch.Tensor]]:
        if not state.active:
            return None
        masks = state.masks.get(slot.index)
        if masks is not None:
            # kept unsliced: only a later negative-only call (a split CFG batch) reads them
            self._last_positive[slot.index] = (masks, state.positive(device))
            return masks
        # a negative-only call (ComfyUI split the batch): reuse the last positive masks of this block
        last = self._last_positive.get(slot.index)
        if last is None or last[0][0].shape[1] != tokens:
            return [torch.ones(batch, tokens, device=device) for _ in self.concepts]
        previous = [m[last[1]] for m in last[0]]
        return [m if m.shape[0] == batch else m[:1].expand(batch, -1) for m in previous]

    def _add_residuals(self, slot: TransformerSlot, state: _CallState):
        def hook(module, args, output):
            x = args[0]
            batch, _, height, width = x.shape
            masks = self._masks_for(slot, state, batch, height * width, x.device)
            if masks is None and self.outside == "base":
                return output
            result = output
            for k in range(len(self.concepts)):
                factors = self._factors(k, slot, x)
                if factors is None:
                    continue
                mask = None if masks is None else masks[k].reshape(batch, 1, height, width)
                result = result + apply_low_rank(x, *factors, mask=mask).to(output.dtype)
            if masks is not None and state.masks.get(slot.index) is not None and state.positive_rows:
                self.recorder.add(height, width, masks, state.positive(x.device))
            return result
        return hook
