"""Sampling cost of the residual: base model vs. PerRes Apply Residuals (global) vs. PerRes LAG Sampling.

One run on the tests' random SD1.5 checkpoint (fp32), the same seed, steps, resolution, conditioning and stock
KSampler (euler / normal, CFG 7) for base (the checkpoint's MODEL), global (PerResApplyResiduals, a weight patch
merged when loaded) and lag (PerResLAGSampling, median masks). Each config runs once untimed, then --repeats times
in a rotating order, its model loaded outside the timer; per-step times from KSampler's progress callback, first
step dropped. Targets: global/base <= 1.01, lag/global <= 1.05 (also from the CPU time inside LAG's hooks, which
other processes hardly move). benchmarks/README.md has the details.

Run from the pack root:  python benchmarks/bench_lag.py [--resolution 128] [--steps 4] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
import harness as h  # noqa: E402

PROMPT = "a photo of a sks dog on the beach"


class HookMeter:
    """CPU time spent inside the LAG hooks (a share of the LAG cost that other processes hardly move).

    Wraps the hook factories of the LagPatch instance (benchmark-side only; the pack is untouched).
    """

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}

    def reset(self) -> None:
        self.cpu.clear()

    def _timed(self, fn, bucket: str):
        def timed(*args, **kwargs):
            start = h.cpu_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu[bucket] = self.cpu.get(bucket, 0.0) + h.cpu_time() - start
        return timed

    def factory(self, factory, bucket: str):
        def make(*args, **kwargs):
            return self._timed(factory(*args, **kwargs), bucket)
        return make

    def install(self, patch) -> None:
        patch._keep_queries = self.factory(patch._keep_queries, "masks (to_q/to_k hooks)")
        patch._make_masks = self.factory(patch._make_masks, "masks (to_q/to_k hooks)")
        patch._add_deltas = self.factory(patch._add_deltas, "residual (proj_out hooks)")
        patch.recorder.add = self._timed(patch.recorder.add, "  of which MaskRecorder.add (in to_k hooks)")


def weight_state(unet) -> str:
    """How the loaded UNet computes: weight functions (per-call casts/patches) and module hooks."""
    functions = sum(len(getattr(m, "weight_function", [])) + len(getattr(m, "bias_function", []))
                    for m in unet.modules())
    casting = sum(bool(getattr(m, "comfy_cast_weights", False)) for m in unet.modules())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())
    return f"{functions} weight functions, {casting} modules casting weights per call, {hooks} module hooks"


def wrapper_setup_cost(unet, repeats: int = 20) -> float:
    """Seconds per UNet call that LagPatch.diffusion_model spends finding blocks and (un)registering 48 hooks."""
    host_model = bc.pack_module("nodes.host.model")
    sd1 = bc.pack_module("perres_core.families").SD1

    def register_and_remove() -> None:
        for _ in range(repeats):
            handles = []
            for _slot, transformer in host_model.transformer_modules(unet, sd1):
                attn2 = transformer.transformer_blocks[0].attn2
                handles.append(attn2.to_q.register_forward_hook(lambda *a: None))
                handles.append(attn2.to_k.register_forward_hook(lambda *a: None))
                handles.append(transformer.proj_out.register_forward_hook(lambda *a: None))
            for handle in handles:
                handle.remove()
    return h.measured(register_and_remove)[0] / repeats


def parse_args() -> argparse.Namespace:
    p = h.arguments(__doc__)
    p.add_argument("--resolution", type=int, default=128, help="image side in px (latent = /8); default 128")
    p.add_argument("--batch", type=int, default=1, help="latent batch size; default 1")
    p.add_argument("--steps", type=int, default=4, help="sampling steps per run; default 4")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per config, interleaved; default 5")
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--profile", metavar="FILE", default=None,
                   help="also run one extra LAG sampling under cProfile and write the stats to FILE")
    return p.parse_args()


def main() -> None:
    opts = parse_args()
    model, clip, vae = bc.load_sd15(opts.device, opts.threads)
    import comfy.model_management as mm
    say = h.say

    residual = bc.pack_module("perres_core.residual")
    residuals = residual.ResidualSet.create(bc.pack_module("perres_core.families").SD1.layer_shapes(),
                                            residual.DEFAULT_RANK_RATIO,
                                            concept=residual.ConceptInfo("sks", "dog"))
    residuals.initialize("random", 0)

    global_model = bc.run_node("PerResApplyResiduals", model=model, residuals=residuals, strength=1.0)[0]
    lag_model, positive = bc.run_node("PerResLAGSampling", model=model, clip=clip, residuals=residuals, prompt=PROMPT,
                                      concept_words="", strength=1.0, threshold="median", quantile=0.5,
                                      start_percent=0.0, end_percent=1.0, outside_window="full residual")
    negative = bc.run_node("CLIPTextEncode", clip=clip, text="")[0]
    latent = bc.run_node("EmptyLatentImage", width=opts.resolution, height=opts.resolution, batch_size=opts.batch)[0]
    patchers = {"base": model, "global": global_model, "lag": lag_model}
    meter = HookMeter()
    meter.install(bc.pack_module("nodes.host.lag_patch").LagPatch.of(lag_model))
    hook_cpu: dict[str, list[float]] = {}
    states: dict[str, str] = {}

    def sample(patcher):
        return bc.run_node("KSampler", model=patcher, seed=opts.seed, steps=opts.steps, cfg=opts.cfg,
                           sampler_name="euler", scheduler="normal", positive=positive, negative=negative,
                           latent_image=latent, denoise=1.0)[0]["samples"]

    def load(name: str) -> None:
        """Outside the timer: for global this is where the weight patch is merged (once per switch, not per step)."""
        mm.load_models_gpu([patchers[name]])
        states.setdefault(name, weight_state(model.model.diffusion_model))
        meter.reset()

    def hook_time(name: str, _run) -> str:
        if name == "lag":
            for bucket, value in meter.cpu.items():
                hook_cpu.setdefault(bucket, []).append(value / opts.steps)
        return ""

    say(f"settings: {opts.resolution}px (latent {opts.resolution // 8}), batch {opts.batch}, {opts.steps} euler steps, "
        f"cfg {opts.cfg}, {opts.repeats} repeats, fp32, device {opts.device}; {h.load_note()}")
    clock = h.StepClock()
    with h.progress_steps(clock):
        runs = h.interleaved({name: (lambda p=p: sample(p)) for name, p in patchers.items()}, opts.repeats,
                             clock=clock, before=load, after=hook_time)
    if opts.profile:
        import cProfile
        import pstats
        load("lag")
        profiler = cProfile.Profile()
        profiler.enable()
        sample(lag_model)
        profiler.disable()
        profiler.dump_stats(opts.profile)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)

    record = h.Record("bench_lag", opts, "per sampling step, KSampler with the base model, PerRes Apply Residuals "
                      "and PerRes LAG Sampling (same seed, latent, CFG); and the time inside LAG's hooks", opts.device,
                      note=f"{opts.resolution} px, {opts.steps} steps")
    for name, series in runs.items():
        say(f"  {name:6s} s/step wall: {h.spread(series.steps)}")
        say(f"         s/step cpu:  {h.spread(series.cpu_steps)}")
        say(f"         run total:   {h.spread(series.totals)}")
        say(f"         load/switch before the run (untimed above): {h.spread(series.before)}")
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
    inside = sum(h.median(v) for k, v in hook_cpu.items() if not k.startswith(" "))
    say(f"  LAG hook cost per sampling step (CPU, median over runs; lag step CPU median {lag_cpu:.3f} s):")
    for bucket in sorted(hook_cpu, key=lambda b: (b.startswith(" "), b.startswith("res"))):
        values = hook_cpu[bucket]
        say(f"    {bucket:42s} {h.median(values) * 1000:8.1f} ms  ({h.median(values) / lag_cpu:6.2%})")
    say(f"    {'wrapper: find blocks + (un)register hooks':42s} {setup * 1000:8.1f} ms  ({setup / lag_cpu:6.2%})")
    extra = inside + setup
    record.ratio("lag/global from hook time", lag_cpu / (lag_cpu - extra), 1.05,
                 "LAG / global Apply, from the time spent in LAG's hooks",
                 detail=f"(LAG-only work is {extra / lag_cpu:.2%} of a LAG step; contention-proof estimate)")
    diff_gb = (glob.output - base.output).abs().max().item()
    diff_lg = (lag.output - glob.output).abs().max().item()
    say(f"  sanity: max |global - base| = {diff_gb:.3g}, max |lag - global| = {diff_lg:.3g} (both should be > 0)")
    say(f"  process peak RSS (ru_maxrss): {h.process_peak_rss()}")
    record.figure("seconds_per_step", {name: series.step for name, series in runs.items()})
    record.figure("cpu_seconds_per_step", {name: series.cpu_step for name, series in runs.items()})
    record.figure("hook_share_of_lag_step", extra / lag_cpu)
    record.figure("unet_state_identical_base_global", same)
    record.figure("sanity_max_abs_diff", {"global_base": diff_gb, "lag_global": diff_lg})
    record.finish(opts.json or h.default_json("bench_lag"))


if __name__ == "__main__":
    main()
