"""LAG for any LoRA: the sampling cost next to the merged LoRA, and the experiment behind its mask policies.

One run, the tests' random-weight SD1.5 checkpoint (fp32), the stock KSampler (euler / normal, CFG 7, so
cond and uncond are batched), the same seed and conditioning for every config. LoRA files are built by
tests/lora_files.py with the names kohya's scripts write.

--part speed   a rank-32 LoRA on every attention and feed-forward layer of the 16 transformer blocks
               (attn1/attn2 to_q, to_k, to_v, to_out; ff.net.0.proj, ff.net.2: 160 layers):
                 merged  LoraLoaderModelOnly (strength 1): weights merged when the model loads;
                 lag     PerRes LAG LoRA + PerRes LAG Sampling (median masks).
               Each config runs once untimed (load, warm-up), then --repeats times interleaved; per-step
               times come from KSampler's progress callback (first step dropped), wall and process CPU.
               Target: lag/merged <= 1.25.
--part policy  the two mask-policy choices of perres_core/lag_layers.py, at --policy-resolution:
  text         a LoRA on attn2.to_k/to_v only, one sampling step. "attention" adds the LoRA's change of the
               attention output inside the mask; "columns" adds ΔK, ΔV only at the trigger words' token
               columns. Inside the finest mask: how much of the merged LoRA's change is kept
               (1 - |lag - merged| / |merged - base|, 1 is all); outside: how much leaks (|lag - base| /
               |merged - base|, 0 is none).
  before       over a --policy-steps run, for every block and step: how often the mask a layer before the
               block's cross-attention gets (proj_in, attn1, attn2.to_q) equals the block's own mask of the
               same step, for "resolution" (newest mask at the layer's resolution) and "block" (the
               block's own mask of the previous step). The first step, where "block" has none, is left out.
The masks of the random-weight model are not those of a real SD1.5; rerun the policy part with real
weights (COMFYUI_PATH host with the checkpoint) before trusting its numbers beyond this model.

Run from the pack root:  python benchmarks/bench_lag_lora.py [--part speed|policy|all] [--resolution 512]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from lora_files import TRANSFORMER_LAYERS, build_lora, write_lora  # noqa: E402  (tests/ is on sys.path)

PROMPT = "a photo of ohwx woman on a beach"
TRIGGER = "ohwx, woman"
ATTENTION_AND_FF = [layer for layer in TRANSFORMER_LAYERS if ".attn" in layer or ".ff." in layer]
TEXT_LAYERS = ("transformer_blocks.0.attn2.to_k", "transformer_blocks.0.attn2.to_v")
BEFORE_LAYERS = ("proj_in", "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k",
                 "transformer_blocks.0.attn1.to_v", "transformer_blocks.0.attn2.to_q")


def all_blocks(layers) -> list[str]:
    slots = bc.pack_module("perres_core.families").SD1.slots
    return [f"{slot.path}.{layer}" for slot in slots for layer in layers]


def write_lora_of(model, name: str, layers: list[str], rank: int, scale: float = 0.3) -> str:
    """A random kohya LoRA on `layers`, written to models/loras; returns its name."""
    import folder_paths
    loras = folder_paths.get_folder_paths("loras")[0]
    return write_lora(loras, name, build_lora(model, "kohya", rank=rank, scale=scale, layers=layers))


def attention_ff_lora(model, rank: int = 32) -> str:
    """The speed benchmark's LoRA: rank `rank` on every attention and feed-forward layer of the 16 blocks."""
    return write_lora_of(model, f"bench_rank{rank}_attention_ff.safetensors", all_blocks(ATTENTION_AND_FF), rank)


def merged_lora_model(model, name: str):
    return bc.run_node("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=1.0)[0]


def lag_lora_model(model, clip, name: str):
    """(model, positive) of PerRes LAG LoRA + PerRes LAG Sampling with median masks."""
    concepts = bc.run_node("PerResLAGLoRA", lora_name=name, trigger_words=TRIGGER, strength=1.0)[0]
    return bc.run_node("PerResLAGSampling", model=model, clip=clip, extra_concepts=concepts, prompt=PROMPT,
                       concept_words="", strength=1.0, threshold="median", quantile=0.5, start_percent=0.0,
                       end_percent=1.0, outside_window="full residual")[:2]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="all", choices=["speed", "policy", "all"])
    p.add_argument("--resolution", type=int, default=512, help="speed part: image side in px; default 512")
    p.add_argument("--steps", type=int, default=3, help="speed part: sampling steps per run; default 3")
    p.add_argument("--repeats", type=int, default=2, help="speed part: timed runs per config; default 2")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--policy-resolution", type=int, default=256)
    p.add_argument("--policy-steps", type=int, default=6)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave torch's default)")
    return p.parse_args()


class Setup:
    def __init__(self, opts) -> None:
        self.opts = opts
        self.model, self.clip, _ = bc.load_sd15(opts.device, opts.threads)
        self.positive = bc.run_node("CLIPTextEncode", clip=self.clip, text=PROMPT)[0]
        self.negative = bc.run_node("CLIPTextEncode", clip=self.clip, text="")[0]

    def lora(self, name: str, layers: list[str], rank: int, scale: float = 0.3) -> str:
        return write_lora_of(self.model, name, layers, rank, scale)

    def merged(self, name: str):
        return merged_lora_model(self.model, name)

    def lag(self, name: str):
        return lag_lora_model(self.model, self.clip, name)[0]

    def sample(self, patcher, resolution: int, steps: int, callback=None):
        latent = bc.run_node("EmptyLatentImage", width=resolution, height=resolution, batch_size=1)[0]
        return bc.run_node("KSampler", model=patcher, seed=self.opts.seed, steps=steps, cfg=7.0,
                           sampler_name="euler", scheduler="normal", positive=self.positive,
                           negative=self.negative, latent_image=latent, denoise=1.0)[0]["samples"]


def speed(setup: Setup) -> None:
    import comfy.model_management as mm
    import torch

    opts, say = setup.opts, bc.say
    name = attention_ff_lora(setup.model, opts.rank)
    configs = {"merged": setup.merged(name), "lag": setup.lag(name)}
    say(f"speed: rank-{opts.rank} LoRA on {len(all_blocks(ATTENTION_AND_FF))} layers, {opts.resolution}px, "
        f"{opts.steps} euler steps, CFG 7, {opts.repeats} repeats, torch threads {torch.get_num_threads()}; "
        f"{bc.load_note()}")
    clock = bc.StepClock()
    wall = {k: [] for k in configs}
    cpu = {k: [] for k in configs}
    with bc.progress_steps(clock):
        for key, patcher in configs.items():
            mm.load_models_gpu([patcher])
            seconds, _ = bc.timed(lambda: setup.sample(patcher, opts.resolution, opts.steps))
            say(f"[warm-up] {key:6s} {seconds:.1f} s")
        for r in range(opts.repeats):
            for key in (list(configs) if r % 2 == 0 else list(configs)[::-1]):
                mm.load_models_gpu([configs[key]])
                clock.reset()
                seconds, _ = bc.timed(lambda: setup.sample(configs[key], opts.resolution, opts.steps))
                wall[key] += clock.durations()
                cpu[key] += clock.cpu_durations()
                say(f"[repeat {r + 1}] {key:6s} total {seconds:.1f} s; steps 2..: "
                    f"{' '.join(f'{d:.2f}' for d in clock.durations())} s wall")
    ratio = bc.median(wall["lag"]) / bc.median(wall["merged"])
    cpu_ratio = bc.median(cpu["lag"]) / bc.median(cpu["merged"])
    say("=" * 78)
    for key in configs:
        say(f"  {key:6s} s/step wall: {bc.spread(wall[key])}")
        say(f"         s/step cpu:  {bc.spread(cpu[key])}")
    say(f"  lag/merged = {ratio:.3f} wall, {cpu_ratio:.3f} cpu  (target <= 1.25: {bc.verdict(ratio, 1.25)})")
    say("=" * 78)


def text_policy(setup: Setup) -> None:
    import torch

    opts, say = setup.opts, bc.say
    lag_patch = bc.pack_module("nodes.host.lag_patch")
    name = setup.lora("bench_text_only.safetensors", all_blocks(TEXT_LAYERS), 8, scale=0.1)
    res = opts.policy_resolution
    base = setup.sample(setup.model, res, 1)
    merged = setup.sample(setup.merged(name), res, 1)
    change = merged - base
    say(f"text policy: LoRA on attn2.to_k/to_v of 16 blocks, {res}px, 1 step; |merged - base| mean "
        f"{change.abs().mean():.4g}")
    for policy in ("attention", "columns"):
        patcher = setup.lag(name)
        patch = lag_patch.LagPatch.of(patcher)
        patch.text_policy = policy
        t0 = time.perf_counter()
        result = setup.sample(patcher, res, 1)
        seconds = time.perf_counter() - t0
        finest = max(patch.recorder.averages().items(), key=lambda item: item[0][0] * item[0][1])[1][0]
        inside = (finest >= 0.5).expand_as(result[0, 0])[None, None].expand_as(result)
        kept = 1 - (result - merged).abs()[inside].mean() / change.abs()[inside].mean()
        leak = (result - base).abs()[~inside].mean() / change.abs()[~inside].mean()
        say(f"  {policy:9s} kept inside {kept:6.3f}   leak outside {leak:6.3f}   ({seconds:.1f} s)")
        del patcher
    torch.cuda.empty_cache() if bc.cuda_active() else None


def before_policy(setup: Setup) -> None:
    import torch

    opts, say = setup.opts, bc.say
    lag_patch = bc.pack_module("nodes.host.lag_patch")
    name = setup.lora("bench_before_only.safetensors", all_blocks(BEFORE_LAYERS), 8)
    patcher = setup.lag(name)
    patch = lag_patch.LagPatch.of(patcher)
    log: list[tuple[int, int, tuple, torch.Tensor]] = []   # (call, slot, size, first concept's masks)
    calls = [0]
    store = patch.bank.store

    def logged_store(slot, size, masks):
        if slot == 0:
            calls[0] += 1
        log.append((calls[0], slot, size, masks[0].detach().cpu().clone()))
        store(slot, size, masks)

    patch.bank.store = logged_store
    setup.sample(patcher, opts.policy_resolution, opts.policy_steps)
    agree = {"resolution": [], "block": []}
    order = sorted(log, key=lambda entry: (entry[0], entry[1]))
    for i, (call, slot, size, own) in enumerate(order):
        if call == 1:
            continue
        previous_block = next(m for c, s, _, m in reversed(order[:i]) if s == slot and c == call - 1)
        newest_at_size = next(m for _, _, z, m in reversed(order[:i]) if z == size)
        agree["block"].append((previous_block == own).float().mean().item())
        agree["resolution"].append((newest_at_size == own).float().mean().item())
    say(f"before policy: {opts.policy_resolution}px, {opts.policy_steps} steps, agreement with the block's own "
        f"mask of the same step (mean over {len(agree['block'])} block-steps):")
    for policy, values in agree.items():
        say(f"  {policy:10s} {sum(values) / len(values):.3f}")


def main() -> None:
    opts = parse_args()
    setup = Setup(opts)
    if opts.part in ("policy", "all"):
        text_policy(setup)
        before_policy(setup)
    if opts.part in ("speed", "all"):
        speed(setup)


if __name__ == "__main__":
    main()
