"""LAG for any LoRA: the sampling cost next to the merged LoRA (--part speed, target lag/merged <= 1.10 in time and
memory), and the experiment behind its mask policies (--part policy: text, before, depth). benchmarks/README.md,
"bench_lag_lora.py".

Run from the pack root:  python benchmarks/bench_lag_lora.py [--family sd15|sdxl|anima|krea2] [--part speed|policy|all]
                         [--resolution 512]
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
import harness as h  # noqa: E402
from lora_files import (DIT_BEFORE_LAYERS, DIT_BLOCK_LAYERS, TRANSFORMER_LAYERS, build_lora,  # noqa: E402
                        write_lora)  # (tests/ is on sys.path)

PROMPT = "a photo of ohwx woman on a beach"
TRIGGER = "ohwx, woman"
ATTENTION_AND_FF = [layer for layer in TRANSFORMER_LAYERS if ".attn" in layer or ".ff." in layer]
TEXT_LAYERS = ("transformer_blocks.0.attn2.to_k", "transformer_blocks.0.attn2.to_v")
BEFORE_LAYERS = ("proj_in", "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k",
                 "transformer_blocks.0.attn1.to_v")
FAMILIES = {"sd15": "SD1", "sdxl": "SDXL", "anima": "ANIMA", "krea2": "KREA2"}
FAMILY_LABELS = {"sd15": "SD1.5", "sdxl": "SDXL bf16", "anima": "Anima bf16", "krea2": "Krea 2 (its 2 test blocks) fp8"}
TARGET = 1.10


def family_of(name: str):
    return getattr(bc.pack_module("perres_core.families"), FAMILIES[name])


def all_blocks(layers, family) -> list[str]:
    """`layers` (named for block 0) in every transformer of `family`, and in each of its blocks."""
    paths = []
    for slot in family.slots:
        for layer in layers:
            if layer.startswith("transformer_blocks.0."):
                rest = layer[len("transformer_blocks.0."):]
                paths += [f"{slot.path}.transformer_blocks.{j}.{rest}" for j in range(slot.depth)]
            else:
                paths.append(f"{slot.path}.{layer}")
    return paths


def write_lora_of(model, name: str, layers: list[str], rank: int, scale: float = 0.3) -> str:
    """A random kohya LoRA on `layers`, written to models/loras; returns its name."""
    import folder_paths
    return write_lora(folder_paths.get_folder_paths("loras")[0], name,
                      build_lora(model, "kohya", rank=rank, scale=scale, layers=layers))


def dit_layers(model, family, layers_by_model: dict[str, tuple[str, ...]]) -> list[str]:
    """The loaded DiT's layers (named inside a block, per model class) in every one of its blocks."""
    depths = family.depths(model.model.model_config.unet_config)
    return [f"{group.prefix}.{n}.{layer}" for group in family.block_groups for n in range(depths[group.prefix])
            for layer in layers_by_model[type(model.model.model_config).__name__]]


def attention_ff_lora(model, family, rank: int = 32) -> tuple[str, int]:
    """The speed benchmark's LoRA, rank `rank` on every attention and feed-forward (MLP) layer of every block:
    its name and its layer count."""
    layers = dit_layers(model, family, DIT_BLOCK_LAYERS) if family.is_dit else all_blocks(ATTENTION_AND_FF, family)
    return write_lora_of(model, f"bench_{family.name}_rank{rank}_attention_ff.safetensors", layers, rank), len(layers)


def merged_lora_model(model, name: str):
    return bc.run_node("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=1.0)[0]


def lag_lora_model(model, clip, name: str):
    """(model, positive) of PerRes LAG LoRA + PerRes LAG Sampling with median masks."""
    concepts = bc.run_node("PerResLAGLoRA", lora_name=name, trigger_words=TRIGGER, strength=1.0)[0]
    return bc.lag_sampling(model, clip, PROMPT, extra_concepts=concepts)


def parse_args():
    # --resolution, --steps, --repeats and --rank are the speed part's
    p = h.arguments(__doc__, resolution=512, steps=3, repeats=2, rank=32, policy_resolution=256, policy_steps=6,
                    seed=42)
    p.add_argument("--family", default="sd15", choices=list(FAMILIES),
                   help="sd15: the random SD1.5 checkpoint in fp32 (default); sdxl: the random SDXL checkpoint, "
                        "UNet in bf16 on the CPU; anima, krea2: the tests' random DiTs (speed, and the before "
                        "policy; Krea 2 with its 2 test blocks, fp8 weights), bf16 compute on the CPU")
    p.add_argument("--part", default="all", choices=["speed", "policy", "all"])
    return p.parse_args()


class Setup:
    """The loaded model of --family, its conditioning, and its LoRAs merged or through LAG LoRA."""

    def __init__(self, opts) -> None:
        self.opts = opts
        precision = "bf16" if opts.family != "sd15" and opts.device == "cpu" else "fp32"
        self.model, self.clip, _ = bc.load_model(opts.family, opts.device, opts.threads, precision)
        self.family = family_of(opts.family)   # (the pack's modules load with the host)
        self.latent = "EmptySD3LatentImage" if self.family.is_dit else "EmptyLatentImage"
        self.positive, self.negative = bc.encode(self.clip, PROMPT), bc.encode(self.clip, "")

    def lag(self, name: str, layers: Optional[list[str]] = None, scale: float = 0.3):
        """The LAG LoRA model of the LoRA `name`; with `layers`, a rank-8 LoRA on them is written first."""
        if layers is not None:
            write_lora_of(self.model, name, layers, 8, scale)
        return lag_lora_model(self.model, self.clip, name)[0]

    def sample(self, patcher, resolution: int, steps: int):
        latent = bc.run_node(self.latent, width=resolution, height=resolution, batch_size=1)[0]
        return bc.ksample(patcher, self.positive, self.negative, latent, steps, 7.0, self.opts.seed,
                          scheduler="simple" if self.family.is_dit else "normal")


def speed(setup: Setup) -> dict[str, h.Series]:
    import comfy.model_management as mm

    opts, say = setup.opts, h.say
    name, layers = attention_ff_lora(setup.model, setup.family, opts.rank)
    configs = {"merged": merged_lora_model(setup.model, name), "lag": setup.lag(name)}
    say(f"speed: {setup.family.name}, rank-{opts.rank} LoRA on {layers} "
        f"layers, {opts.resolution}px, {opts.steps} euler steps, CFG 7, {opts.repeats} repeats; {h.load_note()}")
    clock = h.StepClock()
    with h.progress_steps(clock):
        # each config's untimed first run measures its peak memory: its own weights and buffers appear there
        runs = h.interleaved({key: (lambda p=p: setup.sample(p, opts.resolution, opts.steps))
                              for key, p in configs.items()}, opts.repeats, clock=clock,
                             before=lambda key: mm.load_models_gpu([configs[key]]))
    return runs


def report_speed(runs: dict[str, h.Series], record: h.Record) -> None:
    merged, lag = runs["merged"], runs["lag"]
    for key, series in runs.items():
        series.describe(key)
    record.ratio("lag/merged", lag.step / merged.step, TARGET, "LAG LoRA / merged LoRA",
                 detail=f"({lag.step:.2f} vs {merged.step:.2f} s/step; {lag.cpu_step / merged.cpu_step:.3f} cpu)")
    # peak memory: CUDA's allocator peak per config; on the CPU the process's peak RSS of each config's first
    # run (merged first: its weight backups stay resident afterwards, so LAG's figure includes them too)
    record.ratio("peak memory lag/merged", lag.warmup.peak / merged.warmup.peak, TARGET,
                 "LAG LoRA / merged LoRA, peak memory",
                 detail=f"({h.gib(lag.warmup.peak)[:-4]} vs {h.gib(merged.warmup.peak)})")
    record.figures(seconds_per_step={"merged": merged.step, "lag": lag.step},
                   cpu_seconds_per_step={"merged": merged.cpu_step, "lag": lag.cpu_step})


def text_policy(setup: Setup) -> dict[str, list[float]]:
    import torch

    opts, say = setup.opts, h.say
    lag_patch = bc.pack_module("nodes.host.lag_patch")
    name = f"bench_{setup.family.name}_text_only.safetensors"
    write_lora_of(setup.model, name, all_blocks(TEXT_LAYERS, setup.family), 8, scale=0.1)
    res = opts.policy_resolution
    base = setup.sample(setup.model, res, 1)
    merged = setup.sample(merged_lora_model(setup.model, name), res, 1)
    change = merged - base
    say(f"text policy: LoRA on attn2.to_k/to_v of every block, {res}px, 1 step; |merged - base| mean "
        f"{change.abs().mean():.4g}")
    found = {}
    for policy in ("attention", "columns"):
        patcher = setup.lag(name)
        patch = lag_patch.LagPatch.of(patcher)
        patch.text_policy = policy
        seconds, result = h.measured(lambda p=patcher: setup.sample(p, res, 1))
        finest = max(patch.recorder.averages().items(), key=lambda item: item[0][0] * item[0][1])[1][0]
        # (SDXL's finest transformers sit at half the latent's size)
        finest = torch.nn.functional.interpolate(finest[None, None], size=result.shape[-2:], mode="nearest")[0, 0]
        inside = (finest >= 0.5)[None, None].expand_as(result)
        kept = 1 - (result - merged).abs()[inside].mean() / change.abs()[inside].mean()
        leak = (result - base).abs()[~inside].mean() / change.abs()[~inside].mean()
        say(f"  {policy:9s} kept inside {kept:6.3f}   leak outside {leak:6.3f}   ({seconds:.1f} s)")
        found[f"text, {policy}: kept / leak"] = [kept.item(), leak.item()]
        del patcher
    torch.cuda.empty_cache() if h.cuda_active() else None
    return found


def logged_masks(patch) -> list:
    """Every mask the patch stores during sampling, in execution order: (UNet call, site, size, the first
    concept's positive masks); a site is (transformer, block), block None for the transformer's mask."""
    log: list = []
    store = patch.bank.store

    def logged_store(site, size, masks):
        if site == (0, 0):
            log.append(None)   # a new UNet call starts with the first block of the first transformer
        log.append((sum(entry is None for entry in log), site, size, masks[0].detach().cpu().clone()))
        store(site, size, masks)

    patch.bank.store = logged_store
    return log


def agreement(a, b) -> float:
    return (a == b).float().mean().item()


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# the before policy's candidates, by the rows of docs/benchmarks.md's mask-policy table
BEFORE_ROWS = {"block": "before: the block's mask of the previous step",
               "resolution": "before: the newest mask at the block's resolution (the previous block's, where they "
                             "share it)",
               "estimate": "before: this call's estimate", "earlier mean": "before: running mean of earlier blocks"}


def before_policy(setup: Setup) -> dict[str, Optional[float]]:
    opts, say = setup.opts, h.say
    lag_patch = bc.pack_module("nodes.host.lag_patch")
    layers = dit_layers(setup.model, setup.family, DIT_BEFORE_LAYERS) if setup.family.is_dit else \
        all_blocks(BEFORE_LAYERS, setup.family)
    patcher = setup.lag(f"bench_{setup.family.name}_before_only.safetensors", layers)
    patch = lag_patch.LagPatch.of(patcher)
    patch.before_policy = "estimate"   # an estimate in every call, logged beside the block's own masks
    log = logged_masks(patch)
    estimates = {}
    estimate = patch._estimate

    def logged_estimate(where, state, x, tokens):
        masks = estimate(where, state, x, tokens)
        if masks is not None:
            estimates.setdefault((sum(entry is None for entry in log) + (where.site == (0, 0)), where.site),
                                 masks[0].detach().cpu().clone())
        return masks
    patch._estimate = logged_estimate
    setup.sample(patcher, opts.policy_resolution, opts.policy_steps)
    order = [entry for entry in log if entry is not None]
    agree: dict[str, list[float]] = {policy: [] for policy in BEFORE_ROWS}
    for i, (call, site, size, own) in enumerate(order):
        if call == 1 or site[1] is None:
            continue
        previous_step = next(m for c, s, _, m in reversed(order[:i]) if s == site and c == call - 1)
        newest_at_size = next(m for _, _, z, m in reversed(order[:i]) if z == size)
        agree["block"].append(agreement(previous_step, own))
        agree["resolution"].append(agreement(newest_at_size, own))
        earlier = [m for c, _, z, m in order[:i] if c == call and z == size]
        if earlier:   # a running mean of this step's earlier blocks, split at its median
            mean_map = sum(m.float() for m in earlier) / len(earlier)
            agree["earlier mean"].append(agreement((mean_map > mean_map.median(dim=-1, keepdim=True).values)
                                                   .to(own.dtype), own))
        if (call, site) in estimates:
            agree["estimate"].append(agreement(estimates[(call, site)], own))
    say(f"before policy: {opts.policy_resolution}px, {opts.policy_steps} steps, agreement with the block's own "
        f"mask of the same step (mean over {len(agree['block'])} block-steps):")
    for policy, values in agree.items():
        say(f"  {policy:12s} {mean(values):.3f}  ({len(values)} block-steps)")
    return {BEFORE_ROWS[policy]: mean(values) if values else None for policy, values in agree.items()}


def depth_policy(setup: Setup) -> dict[str, list[float]]:
    opts, say = setup.opts, h.say
    if all(slot.depth == 1 for slot in setup.family.slots):
        say(f"depth policy: every {setup.family.name} transformer has one block; nothing to choose")
        return {}
    lag_patch = bc.pack_module("nodes.host.lag_patch")
    patcher = setup.lag(f"bench_{setup.family.name}_proj_out.safetensors", all_blocks(("proj_out",), setup.family))
    log = logged_masks(lag_patch.LagPatch.of(patcher))
    setup.sample(patcher, opts.policy_resolution, opts.policy_steps)
    entries = [entry for entry in log if entry is not None]
    masks = {(call, site): m for call, site, _, m in entries}
    calls = max(call for call, *_ in entries)
    inner, mean_blocks, last_blocks, mean_stable, last_stable = [], [], [], [], []
    for slot in setup.family.slots:
        if slot.depth == 1:
            continue
        for call in range(1, calls + 1):
            blocks = [masks[(call, (slot.index, j))] for j in range(slot.depth)]
            transformer, last = masks[(call, (slot.index, None))], blocks[-1]
            mean_blocks.append(mean([agreement(transformer, b) for b in blocks]))
            last_blocks.append(mean([agreement(last, b) for b in blocks]))
            if call > 1:
                previous = masks[(call - 1, (slot.index, None))]
                inner.append(mean([agreement(previous, b) for b in blocks]))
                mean_stable.append(agreement(previous, transformer))
                last_stable.append(agreement(masks[(call - 1, (slot.index, slot.depth - 1))], last))
    say(f"depth policy: {setup.family.name}, {opts.policy_resolution}px, {opts.policy_steps} steps, transformers of "
        f"several blocks only:")
    say(f"  inside blocks: the transformer's mask of the previous step equals a block's own mask at "
        f"{mean(inner):.3f} of locations (own mask: 1 by definition)")
    say(f"  proj_out 'mean': agrees with the blocks' own masks {mean(mean_blocks):.3f}, with itself one step "
        f"earlier {mean(mean_stable):.3f}")
    say(f"  proj_out 'last': agrees with the blocks' own masks {mean(last_blocks):.3f}, with itself one step "
        f"earlier {mean(last_stable):.3f}")
    return {"depth: the transformer's previous-step mask vs a block's own": [mean(inner)],
            "depth, proj_out: mean vs blocks / steadiness": [mean(mean_blocks), mean(mean_stable)],
            "depth, proj_out: last block vs blocks / steadiness": [mean(last_blocks), mean(last_stable)]}


@contextlib.contextmanager
def fp32_compute(model):
    """The policy parts compare outputs and masks, not time: a bf16 UNet (SDXL on the CPU) computes them in
    fp32 from its bf16 weights, where bf16 rounding alone would move a sample about as much as a LoRA does
    (tests/test_host_sdxl_lag.py)."""
    import torch

    base = model.model
    before = base.manual_cast_dtype
    if base.get_dtype() == torch.bfloat16:
        base.manual_cast_dtype = torch.float32
    try:
        yield
    finally:
        base.manual_cast_dtype = before


def main() -> None:
    opts = parse_args()
    setup = Setup(opts)
    policy: dict = {}
    if opts.part in ("policy", "all"):
        with fp32_compute(setup.model):
            if not setup.family.is_dit:   # a DiT's text and depth choices: perres_core/lag_layers.py says why none
                policy.update(text_policy(setup))
            policy.update(before_policy(setup))
            if not setup.family.is_dit:
                policy.update(depth_policy(setup))
    runs = speed(setup) if opts.part in ("speed", "all") else {}
    settings = [FAMILY_LABELS[opts.family]] + [f"rank {opts.rank}, {opts.resolution} px"] * bool(runs) + \
        [f"policy {opts.policy_resolution} px, {opts.policy_steps} steps"] * bool(policy)
    record = h.Record("bench_lag_lora", opts,
                      "per sampling step, a LoRA merged by LoraLoaderModelOnly vs the same LoRA through PerRes LAG "
                      "LoRA; and the mask policies' experiment", opts.device, note=", ".join(settings),
                      family=opts.family)
    if runs:
        report_speed(runs, record)
    if policy:   # agreement shares and kept/leak fractions, no targets: docs/benchmarks.md's mask-policy table
        record.figure("policy", policy)
    record.finish(opts.json)


if __name__ == "__main__":
    main()
