"""LAG sampling as a ComfyUI model patch (paper §3.3, Eqs. 2-3), for one or several concepts, each a
PerRes residual or any LoRA of the model's family in residual form (perres_core.layer_delta), on a denoiser of
any family in perres_core.families: UNets (SD1.x, SDXL) and diffusion transformers (Anima, Krea 2).

Per denoiser call a DIFFUSION_MODEL wrapper registers forward hooks, removed again when the call returns (other
clones of the same model never see them):
  * on every block's text attention (the family's TextAttention: a UNet's attn2, Anima's cross_attn, Krea 2's
    joint attn), the query projection's hook turns its base output and the text keys into every concept's
    A_C (image queries × text keys only, read with the block's own norms and RoPE: attention_reader.py) and
    that block's mask (median split by default), on the positive rows; every layer of the block after that
    point uses it. On a UNet transformer of several blocks, the mean of its blocks' maps gives the
    transformer's mask, which its proj_out uses;
  * every layer a concept changes gets f̂ = W·x + Σ_k M_k·(ΔW_k·x), with the mask its role calls for
    (perres_core.lag_layers: the block's own mask once made, the block's previous-step mask or this call's
    estimate before it, the attention-output change for a cross-attention's key/value projections). In a joint
    sequence the text tokens take the change in full.
No attention replace patch or override is used, so packs that replace cross-attention (IP-Adapter style) or
override the attention function keep working, and the attention itself is whatever ComfyUI computes. Stock LoRA
weight patches on the same layers compose, because the hooks only add to the layer outputs.

Batches: ComfyUI stacks chunks [uncond…, cond…] (transformer_options["cond_or_uncond"], 1 = negative,
0 = positive), each with the latent batch's rows. Masks come from the positive rows; a negative row uses
the mask of the positive row for the same image, so both CFG branches see the change in the same place.
When memory is short ComfyUI runs the negative chunk alone, before the positive one; it then reuses the
previous step's positive masks, and at the very first step keeps the base model.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F


from .attention_reader import AttentionReader
from .entry_points import comfy  # the host's modules, imported and checked in one place
from ...perres_core.lag import MaskSettings, concept_attention, concept_columns, concept_masks
from ...perres_core.lag_layers import AttentionSite, Placement, Role, Site, attention_sites, mask_sizes, placement
from ...perres_core.layer_delta import LayerDelta, LowRankDelta, attention, changes_bias
from ...perres_core.families import SD1, ModelFamily

log = logging.getLogger("perres")
WRAPPER_KEY = "perres_lag"
POSITIVE, NEGATIVE = 0, 1


@dataclass
class LagConcept:
    """One concept: its layer deltas (strength folded in) and where its words sit in the prompt's text tokens."""

    deltas: dict[str, LayerDelta]   # denoiser layer path (e.g. 'input_blocks.1.1.proj_out', 'blocks.3.attn.wo')
    positions: list[int]
    label: str = ""


@dataclass
class _CallState:
    """Everything one denoiser call shares between its hooks."""

    positive_rows: list[int]
    pair_of_row: list[int]          # for each row, the positive row whose mask it uses (or -1)
    rows_per_chunk: int
    mode: str                       # "masked", "direct" (W + ΔW everywhere) or "off" (base model)
    sizes: dict[int, tuple[int, int]]   # image token count -> (h, w) of the grids the text attention sees
    context: Optional[torch.Tensor] = None   # the call's text conditioning
    text_length: int = 0            # text tokens in front of the image tokens of a joint sequence (Krea 2)
    # another pack replaces or overrides the attention: its output is then not attn(q, K, V)
    attention_replaced: bool = False
    queries: dict[Site, torch.Tensor] = field(default_factory=dict)  # site -> queries as the attention uses them
    inputs: dict[Site, tuple] = field(default_factory=dict)     # site -> (text context, rope) of the attention call
    keys: dict[Site, tuple] = field(default_factory=dict)       # site -> (K, {concept: K+ΔK})
    values: dict[Site, tuple] = field(default_factory=dict)     # site -> (V, {concept: V+ΔV})
    masks: dict[Site, list[torch.Tensor]] = field(default_factory=dict)  # site -> per concept (B_total, N)
    estimates: dict[Site, list[torch.Tensor]] = field(default_factory=dict)  # site -> early positive masks
    maps: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)  # slot -> concept -> Σ_blocks A (P, N)
    embeddings: dict[str, list] = field(default_factory=dict)  # resblock -> per concept Δe (B, C) or None
    readers: dict = field(default_factory=dict)   # site -> (AttentionSite, AttentionReader) of this call
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

    def image_rows(self, tokens: int) -> slice:
        """Where the image tokens sit among a sequence of `tokens` (after the text of a joint sequence)."""
        if not self.text_length:
            return slice(0, tokens)
        image = next(iter(self.sizes))   # a DiT's one grid of image tokens; reference-image tokens follow it
        return slice(self.text_length, self.text_length + image)


def trailing_padding(text: torch.Tensor) -> int:
    """How many of the text's last tokens are zero in every row: a zero-padded context (Anima pads its LLM
    adapter's output to 512 tokens). Their keys and values are zero (the projections have no bias), so LAG's
    own attention products leave them out and count them instead (perres_core.lag, layer_delta.attention)."""
    used = text.ne(0).any(dim=-1).any(dim=0).nonzero()
    return text.shape[1] - (int(used[-1]) + 1 if len(used) else 0)


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
    # (the block's own mask of the previous step, else this call's estimate) or "estimate" (always this call's
    # estimate from the layer's input).
    # depth: which mask proj_out (the PerRes residual) uses in a transformer of several blocks: "mean" (the
    # median split of the mean of all its blocks' concept attention) or "last" (its last block's own mask).
    text_policy = "attention"
    before_policy = "block"
    depth_policy = "mean"

    def __init__(self, concepts: list[LagConcept], prompt_length: int, settings: MaskSettings,
                 sigma_start: float = float("inf"), sigma_end: float = 0.0, outside: str = "full",
                 prompt_context: Optional[torch.Tensor] = None, warn: Optional[Callable[[str], None]] = None,
                 family: ModelFamily = SD1, depths: Optional[dict[str, int]] = None) -> None:
        """prompt_length: the prompt's text tokens as the denoiser sees them (concept positions count in them);
        prompt_context: the LAG prompt's encoding (1, T, D), to notice a sampler fed other conditioning;
        warn: where sampling-time warnings go (the LAG node's own NodeWarnings), by default the log;
        family: the model's (perres_core.families), whose text attention makes the masks; depths: a DiT's
        blocks per block group (family.depths of the loaded model's unet_config)."""
        settings.validate()
        self.family = family
        self.attention = family.text_attention
        self.sites = attention_sites(family, depths)
        self.concepts = concepts
        self.prompt_length = prompt_length
        self.settings = settings
        self.sigma_start, self.sigma_end = sigma_start, sigma_end
        self.outside = outside          # "full": W + ΔW outside the LAG steps; "base": W
        self.recorder = MaskRecorder()
        self.bank = MaskBank()
        self.placements = {path: placement(path, family) for c in concepts for path in c.deltas}
        self.text_sites = {where.site for where in self.placements.values() if where.role is Role.TEXT}
        # a bias change of a key/value projection makes a zero token's key nonzero: no padding is left out then
        self._text_bias = any(changes_bias(c.deltas[path]) for c in self.concepts for path in c.deltas
                              if self.placements[path].role is Role.TEXT)
        self._columns: dict[tuple, torch.Tensor] = {}
        self._signatures: dict[type, inspect.Signature] = {}
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

    def diffusion_model(self, executor, x, timesteps, context, *args, **kwargs):
        """The denoiser's forward (UNet, Anima, Krea 2: each with its own arguments after the context)."""
        state = self._call_state(x, context, self._transformer_options(executor, args, kwargs))
        if not self._prompt_seen and self.prompt_context is not None and context is not None and state.positive_rows:
            self._prompt_seen = self._holds_prompt(context, state.positive_rows)
        if state.mode == "off":
            return executor(x, timesteps, context, *args, **kwargs)
        handles = []
        try:
            self._register(executor.class_obj, state, handles)
            return executor(x, timesteps, context, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    def _transformer_options(self, executor, args: tuple, kwargs: dict) -> dict:
        if "transformer_options" in kwargs:
            return kwargs["transformer_options"] or {}
        kind = type(executor.class_obj)
        if kind not in self._signatures:
            self._signatures[kind] = inspect.signature(executor.class_obj._forward)  # what the wrapper wraps
        bound = self._signatures[kind].bind_partial(None, None, None, *args, **kwargs).arguments
        return bound.get("transformer_options") or {}

    def _register(self, denoiser: torch.nn.Module, state: _CallState, handles: list) -> None:
        readers = {site.site: (site, AttentionReader(denoiser.get_submodule(site.path(self.family)), self.attention))
                   for site in self.sites}
        state.readers = readers
        if state.mode == "masked":
            # first on each query projection, so that the mask is made from its base output before any change of
            # it (registered below) is added, and exists for every layer of the block that runs after it
            for key, (site, reader) in readers.items():
                handles.append(reader.module.register_forward_pre_hook(self._keep_inputs(key, reader, state),
                                                                       with_kwargs=True))
                handles.append(reader.query.register_forward_hook(self._make_masks(site, reader, state)))
        for path, where in self.placements.items():
            if where.role is Role.TEXT and state.mode == "masked":
                continue
            module = denoiser.get_submodule(path)
            handles.append(module.register_forward_hook(self._add_deltas(path, where, state)))
            if where.role is Role.EMBEDDING:
                out_layers = denoiser.get_submodule(where.resblock).out_layers
                handles.append(out_layers.register_forward_pre_hook(self._add_embedding(where.resblock, state)))
        if state.mode != "masked":
            return
        for key in self.text_sites:
            site, reader = readers[key]
            # after the query projection's own change: the attention change is taken with the queries it uses
            handles.append(reader.query.register_forward_hook(self._keep_queries(key, reader, state)))
            handles.append(reader.key.register_forward_hook(self._keep_keys(site, reader, state)))
            handles.append(reader.value.register_forward_hook(self._keep_values(site, reader, state)))
            if self.text_policy == "attention":
                handles.append(reader.output.register_forward_pre_hook(self._add_attention_change(site, reader, state)))

    def _call_state(self, x: torch.Tensor, context: Optional[torch.Tensor], options: dict) -> _CallState:
        batch = x.shape[0]
        chunks = options.get("cond_or_uncond") or [POSITIVE]
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
        sigmas = options.get("sigmas")
        mode = "masked"
        if sigmas is not None and len(sigmas):
            sigma = float(sigmas.reshape(-1)[0])
            if not self.sigma_end <= sigma <= self.sigma_start:
                mode = "direct" if self.outside == "full" else "off"
        sizes = {h * w: (h, w) for h, w in mask_sizes(self.family, x.shape[-2], x.shape[-1])}
        joint = self.attention.text_tokens == "sequence_start" and context is not None
        replaced = bool(options.get("patches_replace", {}).get("attn2")) or \
            options.get("optimized_attention_override") is not None
        return _CallState(positive_rows=positive_rows, pair_of_row=pair, rows_per_chunk=rows_per_chunk,
                          mode=mode, sizes=sizes, context=context, text_length=context.shape[1] if joint else 0,
                          attention_replaced=replaced)

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

    def _keep_inputs(self, key: Site, reader: AttentionReader, state: _CallState):
        def pre_hook(module, args, kwargs):
            state.inputs[key] = reader.text_and_rope(args, kwargs)
        return pre_hook

    def _concept_maps(self, site: AttentionSite, reader: AttentionReader, queries: torch.Tensor,
                      text: torch.Tensor, rope: Optional[torch.Tensor]) -> dict[int, torch.Tensor]:
        """A_C (Eq. 2) of every concept whose words are in the prompt, (P, N): image `queries` as the attention
        uses them against the keys of the positive rows' `text` tokens, each concept with its own key change
        (a LoRA trained its trigger words' attention). Only image × text logits are formed."""
        key_path = site.path(self.family, self.attention.key)
        length = text.shape[1]
        padding = 0 if rope is not None else self._padding(reader, text)
        text = text[:, :length - padding]
        base = reader.project_keys(text)
        text_rows = slice(0, length) if rope is not None else None
        maps = {}
        for c, concept in enumerate(self.concepts):
            if not concept.positions:
                continue
            delta = concept.deltas.get(key_path)
            keys = base if delta is None else base + delta(text).to(base.dtype)
            columns = self._columns_for(c, length, text.device)
            maps[c] = concept_attention(queries, reader.keys(keys, rope, text_rows), reader.heads,
                                        columns[columns < length - padding], padding)
        return maps

    def _text_of(self, state: _CallState, key: Site, tokens: Optional[torch.Tensor],
                 positive) -> Optional[torch.Tensor]:
        """The positive rows' text tokens the block's attention reads: its context, or the text part of a joint
        sequence `tokens`."""
        if state.text_length:
            return tokens[positive, :state.text_length]
        context = state.inputs.get(key, (None, None))[0]
        context = state.context if context is None else context
        return None if context is None else context[positive]

    def _make_masks(self, site: AttentionSite, reader: AttentionReader, state: _CallState):
        key = site.site

        def hook(module, args, output):
            if not state.positive_rows:
                return None
            rope = state.inputs.get(key, (None, None))[1]
            image = state.image_rows(output.shape[1])
            positive = state.positive(output.device)
            rope_rows = None if rope is None else rope if rope.shape[0] == 1 else rope[positive]
            queries = reader.queries(output[positive, image], rope_rows, image if rope is not None else None)
            text = self._text_of(state, key, args[0], positive)
            if text is None:
                return None
            maps = self._concept_maps(site, reader, queries, text, rope_rows)
            self._keep_site_masks(site, state, queries, maps)
            return None
        return hook

    def _keep_site_masks(self, site: AttentionSite, state: _CallState, queries: torch.Tensor,
                         maps: dict[int, torch.Tensor]) -> None:
        """A block's masks; on a UNet transformer of several blocks, the transformer's mask after its last."""
        size = state.sizes.get(queries.shape[1])
        own = self._store_masks(state, site.site, size, queries, maps)
        if site.slot is None:
            return
        index, j = site.site
        mean = site.depth > 1 and self.depth_policy == "mean"   # one block: its own mask is the transformer's
        if mean:
            sums = state.maps.get(index)
            state.maps[index] = maps if sums is None else {c: sums[c] + m for c, m in maps.items()}
        if j == site.depth - 1:   # the transformer's mask, for its proj_out (and the preview)
            if mean:
                self._store_masks(state, (index, None), size, queries, state.maps.pop(index))
            else:
                self._store_masks(state, (index, None), size, queries, maps, own)

    def _store_masks(self, state: _CallState, site: Site, size: Optional[tuple[int, int]], q: torch.Tensor,
                     maps: dict[int, torch.Tensor], masks: Optional[list[torch.Tensor]] = None) -> list[torch.Tensor]:
        """The site's masks from its concept attention maps (or the given positive `masks`), for every row of
        the call and in the bank; a UNet transformer's masks and every DiT block's also go to the preview.
        Returns the positive masks."""
        if masks is None:
            masks = self._masks_of(maps, q)
        if (site[1] is None or self.family.is_dit) and size is not None:
            self.recorder.add(*size, masks)
        self.bank.store(site, size, masks)
        partner = state.partner_index(q.device)
        state.masks[site] = [m.index_select(0, partner) for m in masks]
        return masks

    def _masks_of(self, maps: dict[int, torch.Tensor], q: torch.Tensor) -> list[torch.Tensor]:
        """Per concept (P, N) masks of the maps; a concept whose words are not in the prompt gets its change
        everywhere."""
        found = dict(zip(maps, concept_masks(list(maps.values()), self.settings)))
        everywhere = torch.ones(q.shape[0], q.shape[1], device=q.device)
        return [found.get(c, everywhere) for c in range(len(self.concepts))]

    def _estimate(self, where: Placement, state: _CallState, x: torch.Tensor,
                  tokens: int) -> Optional[list[torch.Tensor]]:
        """This call's positive masks for a layer that runs before its block's text attention: the block's
        concept map with queries from the layer's own input (the block's input, normalized, in place of what the
        text attention will receive), made once per block and call."""
        key = where.site
        if key not in state.estimates:
            site, reader = state.readers[key]
            width = reader.query.weight.shape[1]
            if not state.positive_rows or x.shape[1 if x.dim() == 4 else -1] != width:
                return None
            positive = state.positive(x.device)
            inputs = x[positive]
            inputs = inputs.flatten(2).transpose(1, 2) if x.dim() == 4 else inputs.reshape(inputs.shape[0], -1, width)
            if inputs.shape[1] != tokens or state.text_length:
                return None
            text = self._text_of(state, key, None, positive)
            if text is None:
                return None
            queries = reader.queries(reader.project_queries(inputs))
            state.estimates[key] = self._masks_of(self._concept_maps(site, reader, queries, text, None), queries)
        return state.estimates[key]

    def _keep_queries(self, key: Site, reader: AttentionReader, state: _CallState):
        def hook(module, args, output):
            state.queries[key] = reader.queries(output)   # a cross-attention: every token is an image token
        return hook

    def _keep_keys(self, site: AttentionSite, reader: AttentionReader, state: _CallState):
        key_path = site.path(self.family, self.attention.key)

        def hook(module, args, keys):
            changed = self._changed_text(key_path, args[0], keys)
            if self.text_policy == "columns":
                keys = self._at_columns(keys, changed)
                changed = {}
            padding = self._padding(reader, args[0])
            used = keys.shape[1] - padding
            state.keys[site.site] = (reader.keys(keys[:, :used]),
                                     {c: reader.keys(k[:, :used]) for c, k in changed.items()}, padding)
            return keys
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

    def _padding(self, reader: AttentionReader, text: torch.Tensor) -> int:
        """The zero tokens at the end of `text` that LAG's attention products may leave out: only where a zero
        token's keys and values are zero with every concept's change too (no bias in the layers or the LoRA)."""
        if reader.key.bias is not None or reader.value.bias is not None or self._text_bias:
            return 0
        return trailing_padding(text)

    def _keep_values(self, site: AttentionSite, reader: AttentionReader, state: _CallState):
        value_path = site.path(self.family, self.attention.value)

        def hook(module, args, values):
            changed = self._changed_text(value_path, args[0], values)
            if self.text_policy == "columns":
                return self._at_columns(values, changed)
            used = values.shape[1] - self._padding(reader, args[0])
            state.values[site.site] = (values[:, :used], {c: v[:, :used] for c, v in changed.items()})
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

    def _image_masks(self, where: Placement, state: _CallState, batch: int, tokens: int,
                     x: torch.Tensor) -> list[torch.Tensor]:
        """Per concept (batch, tokens) masks over a layer's image tokens (lag_layers: the mask each role uses)."""
        masks = None
        if where.role in (Role.AFTER, Role.TEXT):
            masks = state.masks.get(where.site)
            if masks is None:   # a negative-only call (ComfyUI split the batch): the last positive masks of the site
                masks = self._from_bank(self.bank.by_site.get(where.site), state, batch, tokens)
        elif where.role is Role.BEFORE:
            if self.before_policy == "block":
                masks = self._from_bank(self.bank.by_site.get(where.site), state, batch, tokens)
            if masks is None:
                estimate = self._estimate(where, state, x, tokens)
                if estimate is not None:
                    masks = [m.index_select(0, state.partner_index(m.device)) for m in estimate]
        size = state.sizes.get(tokens)
        if masks is None and size is not None:
            masks = self._from_bank(self.bank.at(size), state, batch, tokens)
        if masks is None:   # a layer before every text attention of the run's first call: the base model
            return [torch.zeros(batch, tokens, device=x.device) for _ in self.concepts]
        return masks

    def _masks_for(self, where: Placement, state: _CallState, batch: int, tokens: int,
                   x: torch.Tensor) -> Optional[list[torch.Tensor]]:
        """Per concept (batch, tokens) masks for a layer; None: the change everywhere (M = 1). In a joint
        sequence the text tokens (and reference-image tokens) take every concept's change in full."""
        if state.mode == "direct":
            return None
        if self.settings.constant is not None:
            return [torch.full((batch, tokens), float(self.settings.constant), device=x.device) for _ in self.concepts]
        if where.role is Role.GLOBAL:
            return [torch.zeros(batch, tokens, device=x.device) for _ in self.concepts]
        image = state.image_rows(tokens)
        masks = self._image_masks(where, state, batch, image.stop - image.start, x)
        if image.stop - image.start == tokens:
            return masks
        joint = []
        for mask in masks:
            full = torch.ones(batch, tokens, device=mask.device, dtype=mask.dtype)
            full[:, image] = mask
            joint.append(full)
        return joint

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
            conv = isinstance(module, torch.nn.Conv2d)
            batch = output.shape[0]
            grid = output.shape[-2:] if conv else output.shape[1:-1]
            tokens = grid.numel()
            masks = self._masks_for(where, state, batch, tokens, x)
            # in place when no gradient is recorded (sampling): the layer's fresh output is nobody else's yet,
            # and a new tensor per changed layer was measurable on SDXL's 700 LoRA layers
            in_place = not torch.is_grad_enabled() or not output.requires_grad
            result = output
            for k, delta in enumerate(deltas):
                if delta is None:
                    continue
                mask = None if masks is None else masks[k].reshape(batch, 1, *grid) if conv else \
                    masks[k].reshape(batch, *grid, 1)
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
            masks = self._masks_for(where, state, batch, height * width, h)
            for k, change in enumerate(changes):
                if change is not None:
                    h = h + masks[k].reshape(batch, 1, height, width).to(h.dtype) * change.to(h.dtype)[..., None, None]
            return (h,) + tuple(args[1:])
        return pre_hook

    def _add_attention_change(self, site: AttentionSite, reader: AttentionReader, state: _CallState):
        """out + Σ_k M_k·(attn(q, K+ΔK_k, V+ΔV_k) − attn(q, K, V)): the LoRA's key/value change, inside the mask.

        Without a replace patch or attention override, `out` is the host's own attn(q, K, V), so the change is
        taken against it, in the model's dtype: one extra cross-attention per concept (measured on SDXL, where 70
        blocks made the fp32 pair cost a tenth of a step). A replace patch (IP-Adapter style) or an attention
        override makes `out` its own; the base attention is then computed again, in fp32, and the patch's effect
        stays everywhere."""
        where = Placement(Role.TEXT, slot=site.slot, block=site.site[1], group=site.site[0])
        key = site.site

        def pre_hook(module, args):
            keys, changed_keys, padding = state.keys.pop(key, (None, {}, 0))
            values, changed_values = state.values.pop(key, (None, {}))
            concepts = sorted(set(changed_keys) | set(changed_values))
            if keys is None or values is None or not concepts:
                return None
            out = args[0]
            queries = state.queries.pop(key)
            batch, tokens = out.shape[0], out.shape[1]
            masks = self._masks_for(where, state, batch, tokens, out)
            dtype = torch.float32 if state.attention_replaced else out.dtype
            heads = reader.heads
            base = attention(queries, keys, values, heads, dtype, padding) if state.attention_replaced else out
            result = out
            for c in concepts:
                changed = attention(queries, changed_keys.get(c, keys), changed_values.get(c, values), heads, dtype,
                                    padding)
                result = result + (masks[c].reshape(batch, tokens, 1).to(dtype) * (changed - base)).to(out.dtype)
            return (result,) + tuple(args[1:])
        return pre_hook
