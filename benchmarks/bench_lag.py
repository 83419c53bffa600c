"""Sampling cost of the residual: base model vs. PerRes Apply Residuals (global) vs. PerRes LAG Sampling, on the
tests' random SD1.5 checkpoint (fp32) with the stock KSampler. benchmarks/README.md, "bench_lag.py".

Run from the pack root:  python benchmarks/bench_lag.py [--resolution 128] [--steps 4] [--repeats 5]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
import harness as h  # noqa: E402

PROMPT = "a photo of a sks dog on the beach"
MASKS, RESIDUAL, RECORDER = "masks (to_q/to_k hooks)", "residual (proj_out hooks)", \
    "  of which MaskRecorder.add (in to_k hooks)"


class HookMeter:
    """CPU time inside the LAG hooks, by wrapping the hook factories of one LagPatch (the pack is untouched)."""

    def __init__(self, patch) -> None:
        self.cpu: dict[str, float] = {}
        patch._keep_queries = self._factory(patch._keep_queries, MASKS)
        patch._make_masks = self._factory(patch._make_masks, MASKS)
        patch._add_deltas = self._factory(patch._add_deltas, RESIDUAL)
        patch.recorder.add = self._timed(patch.recorder.add, RECORDER)

    def _timed(self, fn, bucket: str):
        def timed(*args, **kwargs):
            start = h.cpu_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu[bucket] = self.cpu.get(bucket, 0.0) + h.cpu_time() - start
        return timed

    def _factory(self, factory, bucket: str):
        return lambda *args, **kwargs: self._timed(factory(*args, **kwargs), bucket)


def weight_state(unet) -> str:
    """How the loaded UNet computes: weight functions (per-call casts/patches) and module hooks."""
    modules = list(unet.modules())
    functions = sum(len(getattr(m, "weight_function", [])) + len(getattr(m, "bias_function", [])) for m in modules)
    casting = sum(bool(getattr(m, "comfy_cast_weights", False)) for m in modules)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)
    return f"{functions} weight functions, {casting} modules casting weights per call, {hooks} module hooks"


def wrapper_setup_cost(unet, repeats: int = 20) -> float:
    """Seconds per UNet call that LagPatch.diffusion_model spends finding blocks and (un)registering 48 hooks."""
    transformers = bc.pack_module("nodes.host.model").transformer_modules
    sd1 = bc.pack_module("perres_core.families").SD1

    def register_and_remove() -> None:
        for _ in range(repeats):
            handles = []
            for _slot, transformer in transformers(unet, sd1):
                attn2 = transformer.transformer_blocks[0].attn2
                for layer in (attn2.to_q, attn2.to_k, transformer.proj_out):
                    handles.append(layer.register_forward_hook(lambda *a: None))
            for handle in handles:
                handle.remove()
    return h.measured(register_and_remove)[0] / repeats


def main() -> None:
    opts = h.arguments(__doc__, profile=True, resolution=128, batch=1, steps=4, repeats=5, cfg=7.0,
                       seed=42).parse_args()
    model, clip, vae = bc.load_model("sd15", opts.device, opts.threads)
    import comfy.model_management as mm
    say = h.say

    residual = bc.pack_module("perres_core.residual")
    residuals = residual.ResidualSet.create(bc.pack_module("perres_core.families").SD1.layer_shapes(),
                                            residual.DEFAULT_RANK_RATIO, concept=residual.ConceptInfo("sks", "dog"))
    residuals.initialize("random", 0)
    global_model = bc.run_node("PerResApplyResiduals", model=model, residuals=residuals, strength=1.0)[0]
    lag_model, positive = bc.lag_sampling(model, clip, PROMPT, residuals=residuals)
    negative = bc.encode(clip, "")
    latent = bc.run_node("EmptyLatentImage", width=opts.resolution, height=opts.resolution, batch_size=opts.batch)[0]
    patchers = {"base": model, "global": global_model, "lag": lag_model}
    meter = HookMeter(bc.pack_module("nodes.host.lag_patch").LagPatch.of(lag_model))
    hook_cpu: dict[str, list[float]] = {}
    states: dict[str, str] = {}

    def sample(patcher):
        return bc.ksample(patcher, positive, negative, latent, opts.steps, opts.cfg, opts.seed)

    def load(name: str) -> None:
        """Outside the timer: for global this is where the weight patch is merged (once per switch, not per step)."""
        mm.load_models_gpu([patchers[name]])
        states.setdefault(name, weight_state(model.model.diffusion_model))
        meter.cpu.clear()

    def hook_time(name: str, _run) -> str:
        for bucket, value in meter.cpu.items() if name == "lag" else ():
            hook_cpu.setdefault(bucket, []).append(value / opts.steps)
        return ""

    say(f"settings: {opts.resolution}px (latent {opts.resolution // 8}), batch {opts.batch}, {opts.steps} euler steps, "
        f"cfg {opts.cfg}, {opts.repeats} repeats, fp32, device {opts.device}; {h.load_note()}")
    clock = h.StepClock()
    with h.progress_steps(clock):
        runs = h.interleaved({name: (lambda p=p: sample(p)) for name, p in patchers.items()}, opts.repeats,
                             clock=clock, before=load, after=hook_time)
    if opts.profile:
        load("lag")
        h.profiled(lambda: sample(lag_model), opts.profile, "tottime")

    record = h.Record("bench_lag", opts, "per sampling step, KSampler with the base model, PerRes Apply Residuals "
                      "and PerRes LAG Sampling (same seed, latent, CFG); and the time inside LAG's hooks", opts.device,
                      note=f"{opts.resolution} px, {opts.steps} steps")
    for name, series in runs.items():
        series.describe(name)
    base, glob, lag = runs["base"], runs["global"], runs["lag"]
    same = states["global"] == states["base"]
    record.ratio("global/base", glob.step / base.step, 1.01, "global Apply / base model",
                 detail=f"(per-step medians; cpu {glob.cpu_step / base.cpu_step:.3f})")
    record.ratio("lag/global", lag.step / glob.step, 1.05, "LAG / global Apply, raw per-step medians",
                 detail=f"(per-step medians; cpu {lag.cpu_step / glob.cpu_step:.3f})")
    say(f"  global vs base: loaded UNet state {'identical' if same else 'DIFFERENT'} ({states['global']}); only "
        f"the 16 merged proj_out weights differ, so the per-step work is the same and global/base differs from 1 "
        f"only by noise")
    say(f"  by run totals: global/base = {h.median(glob.totals) / h.median(base.totals):.3f}, "
        f"lag/global = {h.median(lag.totals) / h.median(glob.totals):.3f}")
    setup = wrapper_setup_cost(model.model.diffusion_model)
    lag_cpu = lag.cpu_step
    say(f"  LAG hook cost per sampling step (CPU, median over runs; lag step CPU median {lag_cpu:.3f} s):")
    costs = {bucket: h.median(hook_cpu[bucket]) for bucket in (MASKS, RESIDUAL, RECORDER) if bucket in hook_cpu}
    for bucket, cost in {**costs, "wrapper: find blocks + (un)register hooks": setup}.items():
        say(f"    {bucket:42s} {cost * 1000:8.1f} ms  ({cost / lag_cpu:6.2%})")
    extra = setup + sum(cost for bucket, cost in costs.items() if bucket != RECORDER)
    record.ratio("lag/global from hook time", lag_cpu / (lag_cpu - extra), 1.05,
                 "LAG / global Apply, from the time spent in LAG's hooks",
                 detail=f"(LAG-only work is {extra / lag_cpu:.2%} of a LAG step; contention-proof estimate)")
    diff_gb = (glob.output - base.output).abs().max().item()
    diff_lg = (lag.output - glob.output).abs().max().item()
    say(f"  sanity: max |global - base| = {diff_gb:.3g}, max |lag - global| = {diff_lg:.3g} (both should be > 0)")
    say(f"  process peak RSS (ru_maxrss): {h.process_peak_rss()}")
    record.figures(seconds_per_step={name: series.step for name, series in runs.items()},
                   cpu_seconds_per_step={name: series.cpu_step for name, series in runs.items()},
                   hook_share_of_lag_step=extra / lag_cpu, unet_state_identical_base_global=same,
                   sanity_max_abs_diff={"global_base": diff_gb, "lag_global": diff_lg})
    record.finish(opts.json)


if __name__ == "__main__":
    main()
