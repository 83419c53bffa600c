"""LAG sampling as a ComfyUI model patch (paper §3.3, Eqs. 2-3), for one or several concepts, each a
PerRes residual or any SD1.x or SDXL LoRA in residual form (perres_core.layer_delta), on a UNet of any
family in perres_core.families.

Per UNet call a DIFFUSION_MODEL wrapper registers forward hooks, removed again when the call returns (other
clones of the same UNet never see them):
  * attn2.to_q / to_k of every BasicTransformerBlock keep the block's own cross-attention queries and keys
    and turn A_C of every concept into that block's mask (median split by default), on the positive rows;
    after a transformer's last block, the mean of its blocks' maps gives the transformer's mask, which its
    proj_out uses (SDXL: 2 or 10 blocks per transformer; SD1.x: one, and both masks are the same);
  * every layer a concept changes gets f̂ = W·x + Σ_k M_k·(ΔW_k·x), with the mask its role calls for
    (perres_core.lag_layers: the block's own mask after the cross-attention, the newest mask at the
    layer's resolution before it, the attention-output change for attn2's key/value projections).
No attn2 replace patch is used, so packs that replace cross-attention (IP-Adapter style) keep working,
and the attention itself is whatever ComfyUI computes. Stock LoRA weight patches on the same layers
compose, because the hooks only add to the layer outputs.

Batches: ComfyUI stacks chunks [uncond…, cond…] (transformer_options["cond_or_uncond"], 1 = negative,
0 = positive), each with the latent batch's rows. Masks come from the positive rows; a negative row uses
the mask of the positive row for the same image, so both CFG branches see the change in the same place.
When memory is short ComfyUI runs the negative chunk alone, before the positive one; it then reuses the
previous step's positive masks, and at the very first step applies a block's own-mask layers everywhere
(M = 1).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F


from .entry_points import comfy  # the host's modules, imported and checked in one place
from ...perres_core.lag import MaskSettings, concept_attention, concept_columns, concept_masks
from ...perres_core.lag_layers import Placement, Role, level_sizes, placement
from ...perres_core.layer_delta import LayerDelta, LowRankDelta, attention
from ...perres_core.families import SD1, ModelFamily, TransformerSlot
from .model import transformer_modules

log = logging.getLogger("perres")
WRAPPER_KEY = "perres_lag"
POSITIVE, NEGATIVE = 0, 1
Site = tuple[int, Optional[int]]


@dataclass
class LagConcept:
    """One concept: its layer deltas (strength folded in) and where its words sit in the prompt's tokens."""

    deltas: dict[str, LayerDelta]   # UNet layer path (e.g. 'input_blocks.1.1.proj_out') -> delta
    positions: list[int]
    label: str = ""


@dataclass
class _CallState:
    """Everything one UNet call shares between its hooks."""

    positive_rows: list[int]
    pair_of_row: list[int]          # for each row, the positive row whose mask it uses (or -1)
    rows_per_chunk: int
    mode: str                       # "masked", "direct" (W + ΔW everywhere) or "off" (base model)
    sizes: dict[int, tuple[int, int]]   # token count -> (h, w) of the UNet's resolution levels
    # another pack replaces cross-attention somewhere: the host's attention output is then not attn(q, K, V)
    attn2_replaced: bool = False
    # keyed by site: (transformer slot index, BasicTransformerBlock index; None for the whole transformer)
    queries: dict[Site, torch.Tensor] = field(default_factory=dict)
    keys: dict[Site, tuple] = field(default_factory=dict)       # site -> (K, {concept: K+ΔK})
    values: dict[Site, tuple] = field(default_factory=dict)     # site -> (V, {concept: V+ΔV})
    masks: dict[Site, list[torch.Tensor]] = field(default_factory=dict)  # site -> per concept (B_total, N)
    maps: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)  # slot -> concept -> Σ_blocks A (P, N)
    embeddings: dict[str, list] = field(default_factory=dict)  # resblock -> per concept Δe (B, C) or None
    _selector: object = None
    _gather: Optional[torch.Tensor] = None
    _images: dict = field(default_factory=dict)

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


    def image_index(self, positives: int, batch: int, device: torch.device) -> torch.Tensor:
        """For each row, its image's index among `positives` positive rows of an earlier call."""
        key = (positives, batch, device)
        if key not in self._images:
            rows = [(row % self.rows_per_chunk) % positives for row in range(batch)]
            self._images[key] = torch.tensor(rows, device=device)
        return self._images[key]


class MaskRecorder:
    """Average of the positive masks per block resolution and concept, over the steps of one sampling run."""

    def __init__(self) -> None:
        self.sums: dict[tuple[int, int], torch.Tensor] = {}
        self.counts: dict[tuple[int, int], int] = {}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def add(self, height: int, width: int, masks: list[torch.Tensor]) -> None:
        """masks: per concept (P positive rows, h·w)."""
        stacked = torch.stack([m.float().mean(dim=0) for m in masks]).reshape(len(masks), height, width)
        key = (height, width)
        # summed on the sampling device: a copy to the CPU here would stall the GPU 16 times per step
        self.sums[key] = self.sums[key] + stacked if key in self.sums else stacked
        self.counts[key] = self.counts.get(key, 0) + 1

    def averages(self) -> dict[tuple[int, int], torch.Tensor]:
        """(K concepts, h, w) average mask per resolution, on the CPU."""
        return {key: (self.sums[key] / self.counts[key]).cpu() for key in self.sums}


class MaskBank:
    """The newest positive masks (per concept, (P, N)) of each site (a transformer, or one of its blocks)
    and each resolution, kept across the UNet calls of one sampling run: what layers without a mask of
    their own in the current call use. by_slot holds the transformers' masks (the proj_out ones)."""

    def __init__(self) -> None:
        self.by_site: dict[Site, list[torch.Tensor]] = {}
        self.by_slot: dict[int, list[torch.Tensor]] = {}
        self.by_size: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.newest: Optional[tuple[int, int]] = None

    def reset(self) -> None:
        self.by_site.clear()
        self.by_slot.clear()
        self.by_size.clear()
        self.newest = None

    def store(self, site: Site, size: Optional[tuple[int, int]], masks: list[torch.Tensor]) -> None:
        self.by_site[site] = masks
        if site[1] is None:
            self.by_slot[site[0]] = masks
        if size is not None:
            self.by_size[size] = masks
            self.newest = size

    def at(self, size: tuple[int, int]) -> Optional[list[torch.Tensor]]:
        """The newest masks at `size`, else the newest of any size resized to it, else None."""
        if size in self.by_size:
            return self.by_size[size]
        if self.newest is None:
            return None
        (h, w), (h2, w2) = self.newest, size
        resized = []
        for mask in self.by_size[self.newest]:
            grid = mask.float().reshape(mask.shape[0], 1, h, w)
            mode = "area" if h2 <= h and w2 <= w else "nearest"
            resized.append(F.interpolate(grid, size=(h2, w2), mode=mode).reshape(mask.shape[0], h2 * w2))
        return resized


class LagPatch:
    """The callable pieces of LAG, held by the patched ModelPatcher's wrappers."""

    # The mask policies that perres_core.lag_layers chose by experiment; the alternatives stay selectable
    # for benchmarks/bench_lag_lora.py, which measures them. text: "attention" (the attention output's
    # change inside the mask) or "columns" (ΔK, ΔV only at the concept words' columns); before: "block"
    # (the block's own mask of the previous step, else as "resolution") or "resolution" (the newest mask
    # at the layer's resolution).
    # depth: which mask proj_out (the PerRes residual) uses in a transformer of several blocks: "mean" (the
    # median split of the mean of all its blocks' concept attention) or "last" (its last block's own mask).
    text_policy = "attention"
    before_policy = "block"
    depth_policy = "mean"

    def __init__(self, concepts: list[LagConcept], prompt_length: int, settings: MaskSettings,
                 sigma_start: float = float("inf"), sigma_end: float = 0.0, outside: str = "full",
                 prompt_context: Optional[torch.Tensor] = None, warn: Optional[Callable[[str], None]] = None,
                 family: ModelFamily = SD1) -> None:
        """prompt_context: the LAG prompt's encoding (1, T, D), to notice a sampler fed other conditioning;
        warn: where sampling-time warnings go (the LAG node's own NodeWarnings), by default the log;
        family: the model's (perres_core.families), whose transformer blocks make the masks."""
        settings.validate()
        self.family = family
        self.concepts = concepts
        self.prompt_length = prompt_length
        self.settings = settings
        self.sigma_start, self.sigma_end = sigma_start, sigma_end
        self.outside = outside          # "full": W + ΔW outside the LAG steps; "base": W
        self.recorder = MaskRecorder()
        self.bank = MaskBank()
        self.placements = {path: placement(path, family) for c in concepts for path in c.deltas}
        self.text_sites = {where.site for where in self.placements.values() if where.role is Role.TEXT}
        self._columns: dict[tuple, torch.Tensor] = {}
        self.prompt_context = prompt_context
        self._warn = warn or (lambda message: log.warning("PerRes LAG: %s", message))
        self._warned: set[str] = set()      # each kind of warning once per patched model
        self._prompt_seen: Optional[bool] = None  # this run: None before any positive row, then whether one matched

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
        self.bank.reset()
        self._prompt_seen = None
        result = executor(*args, **kwargs)
        if self._prompt_seen is False:
            self._warn_once("conditioning", "the sampler's positive conditioning is not this node's prompt, so the "
                                            "concept words' positions may hold other words and the masks follow "
                                            "them. Wire the LAG node's `positive` output to the sampler's positive "
                                            "input (put extra text in the LAG node's prompt).")
        return result

    def diffusion_model(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        state = self._call_state(x, transformer_options)
        if not self._prompt_seen and self.prompt_context is not None and context is not None and state.positive_rows:
            self._prompt_seen = self._holds_prompt(context, state.positive_rows)
        if state.mode == "off":
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        handles = []
        try:
            self._register(executor.class_obj, state, handles)
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    def _register(self, unet: torch.nn.Module, state: _CallState, handles: list) -> None:
        # layer deltas first, so that the mask hooks below see the queries the block really uses
        for path, where in self.placements.items():
            module = unet.get_submodule(path)
            if where.role is Role.TEXT:
                continue
            handles.append(module.register_forward_hook(self._add_deltas(path, where, state)))
            if where.role is Role.EMBEDDING:
                out_layers = unet.get_submodule(where.resblock).out_layers
                handles.append(out_layers.register_forward_pre_hook(self._add_embedding(where.resblock, state)))
        for slot, transformer in transformer_modules(unet, self.family):
            blocks = transformer.transformer_blocks
            for j, block in enumerate(blocks):
                self._register_block(slot, j, len(blocks), block.attn2, state, handles)

    def _register_block(self, slot: TransformerSlot, j: int, depth: int, attn2: torch.nn.Module, state: _CallState,
                        handles: list) -> None:
        """The hooks of block j's cross-attention: its mask, and the LoRA's change of its keys and values."""
        site = (slot.index, j)
        has_text = site in self.text_sites
        if state.mode == "masked":
            handles.append(attn2.to_q.register_forward_hook(self._keep_queries(site, state)))
            handles.append(attn2.to_k.register_forward_hook(self._make_masks(slot, j, depth, state, attn2.heads)))
        if has_text and state.mode == "masked":
            handles.append(attn2.to_v.register_forward_hook(self._keep_values(slot, j, state)))
            if self.text_policy == "attention":
                handles.append(attn2.to_out.register_forward_pre_hook(
                    self._add_attention_change(slot, j, state, attn2.heads)))
        elif has_text:   # W + ΔW everywhere: the LoRA's keys and values themselves
            for projection in ("to_k", "to_v"):
                path = f"{slot.path}.transformer_blocks.{j}.attn2.{projection}"
                if path in self.placements:
                    handles.append(getattr(attn2, projection).register_forward_hook(
                        self._add_deltas(path, self.placements[path], state)))

    def _call_state(self, x: torch.Tensor, transformer_options: dict) -> _CallState:
        batch = x.shape[0]
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
        mode = "masked"
        if sigmas is not None and len(sigmas):
            sigma = float(sigmas.reshape(-1)[0])
            if not self.sigma_end <= sigma <= self.sigma_start:
                mode = "direct" if self.outside == "full" else "off"
        sizes = {h * w: (h, w) for h, w in level_sizes(x.shape[-2], x.shape[-1])}
        return _CallState(positive_rows=positive_rows, pair_of_row=pair, rows_per_chunk=rows_per_chunk,
                          mode=mode, sizes=sizes,
                          attn2_replaced=bool(transformer_options.get("patches_replace", {}).get("attn2")))

    # --- masks --------------------------------------------------------------------------------
    def _columns_for(self, concept_index: int, context_length: int, device: torch.device) -> torch.Tensor:
        key = (concept_index, context_length, device)
        if key not in self._columns:
            if context_length % self.prompt_length:
                self._warn_once("length", f"the sampler's positive conditioning has {context_length} tokens but the "
                                          f"LAG prompt has {self.prompt_length}; wire the LAG node's `positive` output "
                                          "to the sampler so the concept tokens line up.")
            positions = self.concepts[concept_index].positions
            self._columns[key] = concept_columns(context_length, positions, self.prompt_length).to(device)
        return self._columns[key]

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            self._warn(message)

    def _holds_prompt(self, context: torch.Tensor, positive_rows: list[int]) -> bool:
        """Whether a positive row of the sampler's conditioning is the LAG prompt's encoding.

        LAG finds the concept words at their token positions in its own prompt; a sampler fed another
        encoder's conditioning puts other tokens there, and the masks follow the wrong words without any
        error. A run in which no call holds the prompt gets a warning on the LAG node (outer_sample).
        """
        expected = self.prompt_context[0].to(context.device, torch.float32)
        tokens = min(expected.shape[0], context.shape[1])
        rows = context[positive_rows, :tokens].float()
        # the model may run in fp16: its cast of the same encoding differs by about 1e-3 of the values' scale
        tolerance = 1e-2 * float(expected.abs().amax())
        return any(torch.allclose(row, expected[:tokens], rtol=0.0, atol=tolerance) for row in rows)

    def _keep_queries(self, site: Site, state: _CallState):
        def hook(module, args, output):
            state.queries[site] = output
        return hook

    def _changed_text(self, path: str, text: torch.Tensor, projected: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per concept with a change of this key/value projection: the projection of the prompt with it."""
        changed = {}
        for c, concept in enumerate(self.concepts):
            delta = concept.deltas.get(path)
            if delta is not None:
                changed[c] = projected + delta(text).to(projected.dtype)
        return changed

    def _at_columns(self, projected: torch.Tensor, changed: dict[int, torch.Tensor]) -> torch.Tensor:
        """The "columns" text policy: each concept's ΔK/ΔV only at its own words' token columns."""
        for c, full in changed.items():
            columns = self._columns_for(c, projected.shape[1], projected.device)
            projected = projected.index_copy(1, columns, full.index_select(1, columns))
        return projected

    def _make_masks(self, slot: TransformerSlot, j: int, depth: int, state: _CallState, heads: int):
        site = (slot.index, j)
        key_path = f"{slot.path}.transformer_blocks.{j}.attn2.to_k"

        def hook(module, args, keys):
            # the attention change of a LoRA's key/value projections needs the queries once more
            queries = state.queries.get(site) if site in self.text_sites else state.queries.pop(site, None)
            changed = self._changed_text(key_path, args[0], keys)
            if self.text_policy == "columns":
                keys = self._at_columns(keys, changed)
                changed = {}
            state.keys[site] = (keys, changed)
            if queries is None or not state.positive_rows:
                return keys
            positive = state.positive(queries.device)
            q = queries[positive]
            # a concept's mask comes from its own keys: a LoRA trained its trigger words' attention
            maps = {c: concept_attention(q, changed.get(c, keys)[positive], heads,
                                         self._columns_for(c, keys.shape[1], keys.device))
                    for c, concept in enumerate(self.concepts) if concept.positions}
            size = state.sizes.get(q.shape[1])
            own = self._store_masks(state, site, size, q, maps)
            mean = depth > 1 and self.depth_policy == "mean"   # one block: its own mask is the transformer's
            if mean:
                sums = state.maps.get(slot.index)
                state.maps[slot.index] = maps if sums is None else {c: sums[c] + m for c, m in maps.items()}
            if j == depth - 1:   # the transformer's mask, for its proj_out (and the preview)
                if mean:
                    self._store_masks(state, (slot.index, None), size, q, state.maps.pop(slot.index))
                else:
                    self._store_masks(state, (slot.index, None), size, q, maps, own)
            return keys
        return hook

    def _store_masks(self, state: _CallState, site: Site, size: Optional[tuple[int, int]], q: torch.Tensor,
                     maps: dict[int, torch.Tensor], masks: Optional[list[torch.Tensor]] = None) -> list[torch.Tensor]:
        """The site's masks from its concept attention maps (or the given positive `masks`), for every row of
        the call and in the bank; a transformer's masks also go to the preview. Returns the positive masks."""
        if masks is None:
            found = dict(zip(maps, concept_masks(list(maps.values()), self.settings)))   # each (P, N)
            # a concept whose words are not in the prompt falls back to its change everywhere
            everywhere = torch.ones(q.shape[0], q.shape[1], device=q.device)
            masks = [found.get(c, everywhere) for c in range(len(self.concepts))]
        if site[1] is None and size is not None:
            self.recorder.add(*size, masks)
        self.bank.store(site, size, masks)
        partner = state.partner_index(q.device)
        state.masks[site] = [m.index_select(0, partner) for m in masks]
        return masks

    def _keep_values(self, slot: TransformerSlot, j: int, state: _CallState):
        site = (slot.index, j)
        value_path = f"{slot.path}.transformer_blocks.{j}.attn2.to_v"

        def hook(module, args, values):
            changed = self._changed_text(value_path, args[0], values)
            if self.text_policy == "columns":
                return self._at_columns(values, changed)
            state.values[site] = (values, changed)
            return None
        return hook

    def _from_bank(self, masks: Optional[list[torch.Tensor]], state: _CallState, batch: int,
                   tokens: int) -> Optional[list[torch.Tensor]]:
        """Positive masks of an earlier block or call, (P, N) each, as rows of this call: each row takes the
        mask of the positive row for the same image."""
        if masks is None or masks[0].shape[1] != tokens:
            return None
        index = state.image_index(masks[0].shape[0], batch, masks[0].device)
        return [m.index_select(0, index) for m in masks]

    def _masks_for(self, where: Placement, state: _CallState, batch: int, tokens: int,
                   device: torch.device) -> Optional[list[torch.Tensor]]:
        """Per concept (batch, tokens) masks for a layer; None: the change everywhere (M = 1)."""
        if state.mode == "direct":
            return None
        if self.settings.constant is not None:
            return [torch.full((batch, tokens), float(self.settings.constant), device=device) for _ in self.concepts]
        if where.role is Role.GLOBAL:
            return [torch.zeros(batch, tokens, device=device) for _ in self.concepts]
        if where.role in (Role.AFTER, Role.TEXT):
            own = state.masks.get(where.site)
            if own is not None:
                return own
            # a negative-only call (ComfyUI split the batch): the last positive masks of this site
            return self._from_bank(self.bank.by_site.get(where.site), state, batch, tokens)
        masks = None
        if where.role is Role.BEFORE and self.before_policy == "block":
            masks = self._from_bank(self.bank.by_site.get(where.site), state, batch, tokens)
        size = state.sizes.get(tokens)
        if masks is None and size is not None:
            masks = self._from_bank(self.bank.at(size), state, batch, tokens)
        if masks is None:   # nothing known yet in this sampling run: the base model
            return [torch.zeros(batch, tokens, device=device) for _ in self.concepts]
        return masks

    # --- layer changes ------------------------------------------------------------------------
    def _add_deltas(self, path: str, where: Placement, state: _CallState):
        """f̂ = W·x + Σ_k M_k·(ΔW_k·x) at the layer's output."""
        deltas = [c.deltas.get(path) for c in self.concepts]

        def hook(module, args, output):
            x = args[0]
            if where.role is Role.EMBEDDING and state.mode == "masked":
                # moved to where the ResBlock adds the embedding to its feature map (_add_embedding)
                state.embeddings[where.resblock] = [None if d is None else d(x) for d in deltas]
                return None
            spatial = output.dim() == 4
            batch = output.shape[0]
            tokens = output.shape[-2] * output.shape[-1] if spatial else output.shape[1] if output.dim() == 3 else 1
            masks = None if where.role is Role.TEXT else self._masks_for(where, state, batch, tokens, x.device)
            # in place when no gradient is recorded (sampling): the layer's fresh output is nobody else's yet,
            # and a new tensor per changed layer was measurable on SDXL's 700 LoRA layers
            in_place = not torch.is_grad_enabled() or not output.requires_grad
            result = output
            for k, delta in enumerate(deltas):
                if delta is None:
                    continue
                mask = None if masks is None else (
                    masks[k].reshape(batch, 1, *output.shape[-2:]) if spatial
                    else masks[k].reshape(batch, tokens, 1) if output.dim() == 3 else masks[k].reshape(batch, 1))
                if in_place and isinstance(delta, LowRankDelta) and delta.add_into(result, x, mask):
                    continue
                change = delta(x, mask=mask).to(output.dtype)
                result = result.add_(change) if in_place else result + change
            return result
        return hook

    def _add_embedding(self, resblock: str, state: _CallState):
        """h + e + Σ_k M_k·Δe_k, where the ResBlock hands h + e to its out_layers."""
        where = Placement(Role.EMBEDDING, resblock=resblock)

        def pre_hook(module, args):
            changes = state.embeddings.pop(resblock, None)
            if not changes:
                return None
            h = args[0]
            batch, _, height, width = h.shape
            masks = self._masks_for(where, state, batch, height * width, h.device)
            for k, change in enumerate(changes):
                if change is not None:
                    h = h + masks[k].reshape(batch, 1, height, width).to(h.dtype) * change.to(h.dtype)[..., None, None]
            return (h,) + tuple(args[1:])
        return pre_hook

    def _add_attention_change(self, slot: TransformerSlot, j: int, state: _CallState, heads: int):
        """out + Σ_k M_k·(attn(q, K+ΔK_k, V+ΔV_k) − attn(q, K, V)): the LoRA's key/value change, inside the mask.

        Without an attn2 replace patch, `out` is the host's own attn(q, K, V), so the change is taken against
        it, in the model's dtype: one extra cross-attention per concept (measured on SDXL, where 70 blocks
        made the fp32 pair cost a tenth of a step). A replace patch (IP-Adapter style) makes `out` its own;
        the base attention is then computed again, in fp32, and the patch's effect stays everywhere."""
        where = Placement(Role.TEXT, slot=slot, block=j)
        site = where.site

        def pre_hook(module, args):
            keys, changed_keys = state.keys.pop(site, (None, {}))
            values, changed_values = state.values.pop(site, (None, {}))
            concepts = sorted(set(changed_keys) | set(changed_values))
            if keys is None or values is None or not concepts:
                return None
            out = args[0]
            queries = state.queries.pop(site)
            batch, tokens = out.shape[0], out.shape[1]
            masks = self._masks_for(where, state, batch, tokens, out.device)
            dtype = torch.float32 if state.attn2_replaced else out.dtype
            base = attention(queries, keys, values, heads, dtype) if state.attn2_replaced else out
            result = out
            for c in concepts:
                changed = attention(queries, changed_keys.get(c, keys), changed_values.get(c, values), heads, dtype)
                result = result + (masks[c].reshape(batch, tokens, 1).to(dtype) * (changed - base)).to(out.dtype)
            return (result,) + tuple(args[1:])
        return pre_hook
