"""Training at the paper's setting (512 px, batch 4): memory and time of the frozen-UNet bound and PerRes without
and with gradient checkpointing, each in fresh child processes. Targets: plain/ckpt extra peak >= 3, ckpt/plain
s/step <= 1.4, plain/bound s/step <= 1.10. benchmarks/README.md, "bench_paper_scale.py" (512 px needs about 13 GiB
and 15 minutes on the 2-core VM; `--resolution 256` is a quicker look).

Run from the pack root:
    python benchmarks/bench_paper_scale.py [--family sd15] [--resolution 512] [--batch 4] [--steps 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
import harness as h  # noqa: E402
from bench_training import run_bound  # noqa: E402

TRAINERS = ("bound", "plain", "ckpt")


def parse_args() -> argparse.Namespace:
    p = h.arguments(__doc__, resolution=512, batch=4)
    p.add_argument("--family", default="sd15", choices=bc.FAMILY_CHOICES,
                   help="sd15: the random SD1.5 checkpoint in fp32 (default); sdxl: the random SDXL checkpoint, "
                        "UNet in bf16 (what fits this machine; set --resolution, e.g. 1024 for SDXL's own); anima, "
                        "krea2: the random DiTs through the stock loaders (Anima bf16 at its exact size, Krea 2 with "
                        "fp8 weights and 2 of its 28 blocks)")
    p.add_argument("--krea2-blocks", type=int, default=2,
                   help="blocks of the random Krea 2 (default the tests' 2; its training memory grows per block)")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                   help="UNet weights; default fp32 for sd15, bf16 for sdxl")
    p.add_argument("--steps", type=int, default=2, help="timed steps per trainer (plus 1 warm-up); default 2")
    p.add_argument("--attention", default="pytorch", choices=["pytorch", "default"],
                   help="pytorch: torch's fused attention, as ComfyUI runs on NVIDIA GPUs (default); default: "
                        "ComfyUI's CPU choice, sub-quadratic attention that keeps the N×N scores for backward")
    p.add_argument("--only", choices=TRAINERS, default=None, help=argparse.SUPPRESS)  # one child's trainer
    return p.parse_args()


def precision(opts: argparse.Namespace) -> str:
    return opts.precision or ("fp32" if opts.family == "sd15" else "bf16")


def measure(name: str, model, clip, vae, images, latents, conditioning, opts) -> dict:
    """Seconds per step and extra peak memory of one trainer."""
    clock = h.StepClock()
    with h.optimizer_steps(clock), h.TrainingPeak(model.model.diffusion_model) as peak:
        if name == "bound":
            run_bound(model, latents, conditioning, opts.batch, opts.steps, seed=0, clock=clock)
        else:
            bc.train_perres(model, clip, vae, images, opts.steps + 1, opts.batch, opts.resolution,
                            gradient_checkpointing=name == "ckpt")
    # the bound restarts its clock after its warm-up step; the node's intervals between optimizer steps are 2..N
    durations = clock.durations()
    return {"seconds_per_step": h.median(durations), "step_seconds": durations,
            "cpu_seconds_per_step": h.median(clock.cpu_durations()), "total_seconds": peak.seconds,
            "extra_peak_bytes": peak.extra_bytes, "cuda_peak_allocated_bytes": peak.cuda_peak}


def run_one(opts: argparse.Namespace) -> dict:
    """In a child process: load the model and measure the trainer opts.only."""
    model, clip, vae = bc.load_model(opts.family, opts.device, opts.threads, precision(opts), opts.attention,
                                     krea2_blocks=opts.krea2_blocks)
    images = bc.make_images(opts.batch, opts.resolution)
    latents = bc.image_latents(model, vae, images)
    conditioning = bc.pack_module("nodes.host.training").caption_conditioning(
        model, clip, "a photo of a sks dog", opts.resolution, opts.resolution)
    # One tiny run first: the first training on a model swaps its inference-tensor weights for ordinary
    # ones once (nodes/host/training.frozen_for_backward); that one-off copy must not count as a peak.
    bc.train_perres(model, clip, vae, bc.make_images(1, 64), 1, 1, 64, gradient_checkpointing=False)
    result = measure(opts.only, model, clip, vae, images, latents, conditioning, opts)
    result["unet_dtype"] = str(model.model.get_dtype())
    return result


# glibc: blocks of 128 KiB and more are mmapped and unmapped on free, so RSS tracks live memory
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def run_child(opts: argparse.Namespace, name: str, extra_env: dict) -> dict:
    import subprocess
    args = [sys.executable, os.path.abspath(__file__), "--only", name, "--precision", precision(opts)]
    for key in ("family", "resolution", "batch", "steps", "device", "threads", "attention", "krea2_blocks"):
        args += [f"--{key.replace('_', '-')}", str(getattr(opts, key))]
    child = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **extra_env})
    lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    if child.returncode != 0 or not lines:
        sys.stderr.write(child.stderr[-4000:])
        raise SystemExit(f"the {name} measurement failed (exit {child.returncode}); its log is above")
    return json.loads(lines[-1][len("RESULT "):])


def run_children(opts: argparse.Namespace) -> dict:
    results = {}
    for name in TRAINERS:
        timing = run_child(opts, name, {})
        if opts.device == "cpu":
            memory = run_child(opts, name, LIVE_MEMORY_ENV)
            timing["extra_peak_bytes_default_malloc"] = timing["extra_peak_bytes"]
            timing["extra_peak_bytes"] = memory["extra_peak_bytes"]
        results[name] = r = timing
        h.say(f"  {name:5s}: {r['seconds_per_step']:.2f} s/step (steps "
              f"{', '.join(f'{d:.2f}' for d in r['step_seconds'])}), extra peak {h.gib(r['extra_peak_bytes'])}"
              + (f" (RSS with glibc's default threshold: {h.gib(r['extra_peak_bytes_default_malloc'])})"
                 if opts.device == "cpu" else ""))
    return results


def main() -> None:
    opts = parse_args()
    if opts.only:
        h.say("RESULT " + json.dumps(run_one(opts)))
        return
    say = h.say
    say(f"settings: {opts.resolution} px, batch {opts.batch}, {opts.steps} timed steps (+1 warm-up) per trainer, "
        f"device {opts.device}, fresh child processes per trainer; {h.load_note()}")
    results = run_children(opts)
    bound, plain, ckpt = (results[n] for n in TRAINERS)
    bc.set_threads(opts.threads)  # the record names the children's torch threads
    record = h.Record("bench_paper_scale", opts,
                      "per training step and peak memory above the loaded model: the frozen-UNet bound, "
                      "PerRes without and with gradient checkpointing", opts.device,
                      note=f"{opts.resolution} px, batch {opts.batch}", family=opts.family)
    record.data["host"]["dynamic_vram"] = "off (the children start the host without it)"
    say(f"PAPER SCALE  {opts.family}  {opts.resolution} px  batch {opts.batch}  UNet {plain['unet_dtype']}")
    say(f"  {'trainer':22s} {'s/step':>8s} {'cpu s/step':>11s} {'extra peak':>12s}")
    labels = {"bound": "frozen-UNet bound", "plain": "PerRes, no checkpoint", "ckpt": "PerRes, checkpointing"}
    for name in TRAINERS:
        r = results[name]
        say(f"  {labels[name]:22s} {r['seconds_per_step']:8.2f} {r['cpu_seconds_per_step']:11.2f} "
            f"{h.gib(r['extra_peak_bytes']):>12s}")
    per_step = {name: results[name]["seconds_per_step"] for name in TRAINERS}
    cpu = {name: results[name]["cpu_seconds_per_step"] for name in TRAINERS}
    record.ratio("plain/bound", per_step["plain"] / per_step["bound"], 1.10,
                 "PerRes step / bound, no checkpointing",
                 detail=f"({per_step['plain']:.2f} vs {per_step['bound']:.2f} s/step; "
                        f"cpu {cpu['plain'] / cpu['bound']:.3f})")
    record.ratio("extra peak plain/ckpt", plain["extra_peak_bytes"] / max(ckpt["extra_peak_bytes"], 1), 3,
                 "extra peak memory, checkpointing off / on", compare=">=",
                 detail=f"({h.gib(plain['extra_peak_bytes'])[:-4]} vs {h.gib(ckpt['extra_peak_bytes'])})")
    record.ratio("ckpt/plain", per_step["ckpt"] / per_step["plain"], 1.4, "step time, checkpointing on / off",
                 detail=f"wall, {cpu['ckpt'] / cpu['plain']:.3f} CPU ({per_step['ckpt']:.2f} vs "
                        f"{per_step['plain']:.2f} s/step)")
    say(f"  ({h.load_note()}; on a busy machine trust the cpu ratios more)")
    record.figure("trainers", {name: {**r, "extra_peak_gib": r["extra_peak_bytes"] / h.GIB}
                               for name, r in results.items()})
    record.finish(opts.json)


if __name__ == "__main__":
    main()
