"""Sampling cost of the residual: base model vs. PerRes Apply Residuals (global) vs. PerRes LAG Sampling.

One run, one model (the tests' random-weight SD1.5 checkpoint, fp32), the same seed, steps,
resolution, conditioning and stock KSampler (euler / normal, CFG 7, so cond and uncond are batched):

  base    the checkpoint's MODEL as loaded;
  global  PerResApplyResiduals(strength 1): W + ΔW as a ComfyUI weight patch (merged when loaded);
  lag     PerResLAGSampling (median masks): hooks on attn2.to_q/to_k and proj_out in every block.

The residual is a randomly initialised ResidualSet (the values do not affect the cost). Each config
is run once untimed (load + warm-up), then --repeats times, interleaved, in a rotating order. Before
each timed run the config's model is loaded outside the timer (for `global` this is where the weight
patch is merged; that switch cost is printed separately). Per-step times come from the progress
callback KSampler calls after every sampling step; the first step of each run is dropped.

Run from the pack root:  python benchmarks/bench_lag.py [--resolution 128] [--steps 4] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

PROMPT = "a photo of a sks dog on the beach"


class HookMeter:
    """Wall and CPU time spent inside the LAG hooks (contention-proof share of the LAG cost).

    Wraps the hook factories of the LagPatch instance (benchmark-side only; the pack is untouched).
    """

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()

    def _timed(self, fn, bucket: str):
        def timed(*args, **kwargs):
            w0, c0 = time.perf_counter(), bc.cpu_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[bucket] = self.wall.get(bucket, 0.0) + time.perf_counter() - w0
                self.cpu[bucket] = self.cpu.get(bucket, 0.0) + bc.cpu_time() - c0
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
    t0 = time.perf_counter()
    for _ in range(repeats):
        handles = []
        for _slot, transformer in host_model.transformer_modules(unet, bc.pack_module("perres_core.families").SD1):
            attn2 = transformer.transformer_blocks[0].attn2
            handles.append(attn2.to_q.register_forward_hook(lambda *a: None))
            handles.append(attn2.to_k.register_forward_hook(lambda *a: None))
            handles.append(transformer.proj_out.register_forward_hook(lambda *a: None))
        for handle in handles:
            handle.remove()
    return (time.perf_counter() - t0) / repeats


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=128, help="image side in px (latent = /8); default 128")
    p.add_argument("--batch", type=int, default=1, help="latent batch size; default 1")
    p.add_argument("--steps", type=int, default=4, help="sampling steps per run; default 4")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per config, interleaved; default 5")
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave torch's default)")
    p.add_argument("--profile", metavar="FILE", default=None,
                   help="also run one extra LAG sampling under cProfile and write the stats to FILE")
    return p.parse_args()


def main() -> None:
    opts = parse_args()
    model, clip, vae = bc.load_sd15(opts.device, opts.threads)
    import torch
    import comfy.model_management as mm
    say = bc.say

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
    configs = {"base": model, "global": global_model, "lag": lag_model}
    meter = HookMeter()
    meter.install(bc.pack_module("nodes.host.lag_patch").LagPatch.of(lag_model))
    hook_wall, hook_cpu, states = [], {}, {}

    def sample(patcher):
        return bc.run_node("KSampler", model=patcher, seed=opts.seed, steps=opts.steps, cfg=opts.cfg,
                           sampler_name="euler", scheduler="normal", positive=positive, negative=negative,
                           latent_image=latent, denoise=1.0)[0]

    def load(patcher) -> float:
        seconds, _ = bc.timed(lambda: mm.load_models_gpu([patcher]))
        return seconds

    say(f"settings: {opts.resolution}px (latent {opts.resolution // 8}), batch {opts.batch}, {opts.steps} euler steps, "
        f"cfg {opts.cfg}, {opts.repeats} repeats, fp32, device {opts.device}, torch threads {torch.get_num_threads()}; "
        f"{bc.load_note()}")
    clock = bc.StepClock()
    steps = {name: [] for name in configs}
    cpu_steps = {name: [] for name in configs}
    totals = {name: [] for name in configs}
    switches = {name: [] for name in configs}
    outputs = {}
    with bc.progress_steps(clock):
        for name, patcher in configs.items():     # warm-up: first load, allocator, caches
            load(patcher)
            states[name] = weight_state(model.model.diffusion_model)
            say(f"[loaded]  {name:6s} UNet state: {states[name]}")
            seconds, out = bc.timed(lambda: sample(patcher))
            outputs[name] = out["samples"]
            say(f"[warm-up] {name:6s} {seconds:.2f} s")
        order = list(configs)
        for r in range(opts.repeats):
            for name in order[r % 3:] + order[:r % 3]:
                patcher = configs[name]
                switches[name].append(load(patcher))
                clock.reset()
                meter.reset()
                seconds, _ = bc.timed(lambda: sample(patcher))
                if name == "lag":
                    for bucket, value in meter.cpu.items():
                        hook_cpu.setdefault(bucket, []).append(value / opts.steps)
                    hook_wall.append(sum(v for k, v in meter.wall.items() if not k.startswith(" ")) / opts.steps)
                durations = clock.durations()
                steps[name] += durations            # steps 2..S (step 1 dropped)
                cpu_steps[name] += clock.cpu_durations()
                totals[name].append(seconds)
                say(f"[repeat {r + 1}] {name:6s} total {seconds:.3f} s; steps 2..{opts.steps} wall "
                    f"{' '.join(f'{d:.3f}' for d in durations)} | cpu "
                    f"{' '.join(f'{d:.3f}' for d in clock.cpu_durations())}; load before it {switches[name][-1]:.3f} s")

    if opts.profile:
        import cProfile
        import pstats
        load(lag_model)
        profiler = cProfile.Profile()
        profiler.enable()
        sample(lag_model)
        profiler.disable()
        profiler.dump_stats(opts.profile)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)

    step_median = {name: bc.median(v) for name, v in steps.items()}
    cpu_median = {name: bc.median(v) for name, v in cpu_steps.items()}
    total_median = {name: bc.median(v) for name, v in totals.items()}
    say("")
    say("=" * 78)
    bc.say_settings(opts, "per sampling step, KSampler with the base model, PerRes Apply Residuals and PerRes "
                            "LAG Sampling (same seed, latent, CFG); and the time inside LAG's hooks")
    say(f"LAG SAMPLING  {opts.resolution}px  batch {opts.batch}  {opts.steps} steps  cfg {opts.cfg}  fp32  "
        f"device {opts.device}  torch threads {torch.get_num_threads()}")
    say(f"  {bc.load_note()}")
    for name in configs:
        say(f"  {name:6s} s/step wall: {bc.spread(steps[name])}")
        say(f"         s/step cpu:  {bc.spread(cpu_steps[name])}")
        say(f"         run total:   {bc.spread(totals[name])}")
        say(f"         load/switch before the run (untimed above): {bc.spread(switches[name])}")
    g_b, l_g = step_median["global"] / step_median["base"], step_median["lag"] / step_median["global"]
    say(f"  global/base = {g_b:.3f}   (per-step medians; target <= 1.01: {bc.verdict(g_b, 1.01)})")
    say(f"  lag/global  = {l_g:.3f}   (per-step medians; target <= 1.05: {bc.verdict(l_g, 1.05)})")
    say(f"  cpu time:      global/base = {cpu_median['global'] / cpu_median['base']:.3f}, "
        f"lag/global = {cpu_median['lag'] / cpu_median['global']:.3f}")
    same = "identical" if states["global"] == states["base"] else "DIFFERENT"
    say(f"  global vs base: loaded UNet state {same} ({states['global']}); only the 16 merged proj_out weights "
        f"differ, so the per-step work is the same and global/base differs from 1 only by noise")
    say(f"  by run totals: global/base = {total_median['global'] / total_median['base']:.3f}, "
        f"lag/global = {total_median['lag'] / total_median['global']:.3f}")
    setup = wrapper_setup_cost(model.model.diffusion_model)
    lag_cpu = cpu_median["lag"]
    inside = sum(bc.median(v) for k, v in hook_cpu.items() if not k.startswith(" "))
    say(f"  LAG hook cost per sampling step (CPU, median over runs; lag step CPU median {lag_cpu:.3f} s):")
    for bucket in sorted(hook_cpu, key=lambda b: (b.startswith(" "), b.startswith("res"))):
        values = hook_cpu[bucket]
        say(f"    {bucket:42s} {bc.median(values) * 1000:8.1f} ms  ({bc.median(values) / lag_cpu:6.2%})")
    say(f"    {'wrapper: find blocks + (un)register hooks':42s} {setup * 1000:8.1f} ms  ({setup / lag_cpu:6.2%})")
    extra = inside + setup
    say(f"  => LAG-only work is {extra / lag_cpu:.2%} of a LAG step: lag/global from hook time = "
        f"{lag_cpu / (lag_cpu - extra):.3f} (contention-proof estimate; target <= 1.05)")
    diff_gb = (outputs["global"] - outputs["base"]).abs().max().item()
    diff_lg = (outputs["lag"] - outputs["global"]).abs().max().item()
    say(f"  sanity: max |global - base| = {diff_gb:.3g}, max |lag - global| = {diff_lg:.3g} (both should be > 0)")
    say(f"  process peak RSS (ru_maxrss): {bc.process_peak_rss()}")
    say("=" * 78)


if __name__ == "__main__":
    main()
