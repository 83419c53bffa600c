"""Training at the paper's setting (512 px, batch 4): memory and time with and without gradient checkpointing.

One run, one model (the tests' random-weight SD1.5 checkpoint, fp32 on the CPU; with --family sdxl the
random SDXL checkpoint, its UNet in bf16), three trainers:

  bound    the frozen UNet called directly, forward + backward + AdamW on the residuals (no ComfyUI
           code in the loop, no checkpointing): the least a training step can cost.
  plain    the PerResTrainResiduals node with gradient_checkpointing off.
  ckpt     the PerResTrainResiduals node with gradient_checkpointing on (its default).

For each: seconds per step (the interval between optimizer steps, warm-up step excluded) and the
training's extra peak memory (above what was in use when the UNet first ran: the loaded model and the
latents are excluded, so is the VAE encoding the node does first). Each trainer runs in fresh child
processes, so one trainer's freed-but-kept heap cannot hide the next one's peak. On the CPU, memory
comes from a second child per trainer that runs with glibc's mmap threshold fixed at 128 KiB
(MALLOC_MMAP_THRESHOLD_): every larger block freed goes back to the OS at once, so the resident set
follows the live tensors. With glibc's default (dynamic) threshold freed blocks stay in the heap and the
resident set overstates what is live (at 512 px: checkpointing 3.1 GiB instead of 1.2), but the fixed
threshold's page faults slow the steps, so seconds per step come from the default child. Ratios and targets:

  plain extra peak / ckpt extra peak   >= 3     (checkpointing must cut the extra peak at least 3x)
  ckpt s/step / plain s/step           <= 1.4   (and cost at most 1.4x per step)
  plain s/step / bound s/step          <= 1.10  (without it, PerRes adds at most 10 % to the bound)

On this 2-core CPU VM, 512 px needs about 13 GiB of memory in all without checkpointing and about
30 s per step (six child processes, about 15 minutes): run nothing else meanwhile. `--resolution 256`
is a quicker look.

SDXL at its own 1024 px, batch 4, takes many minutes per step on this CPU; `--family sdxl --resolution 512
--batch 1` is what it measures in reasonable time (benchmarks/README.md has the figures). The DiTs the same way:
`--family anima --resolution 256 --batch 1` (Anima at its exact 2 B size, bf16) and `--family krea2` (Krea 2's
exact block at its width with 2 of its 28 blocks, fp8 weights) run in minutes; the bound is then the frozen
DiT's forward + backward.

Run from the pack root:
    python benchmarks/bench_paper_scale.py [--family sd15] [--resolution 512] [--batch 4] [--steps 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from bench_training import make_images, run_bound  # noqa: E402

TRAINERS = ("bound", "plain", "ckpt")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="sd15", choices=bc.FAMILY_CHOICES,
                   help="sd15: the random SD1.5 checkpoint in fp32 (default); sdxl: the random SDXL checkpoint, "
                        "UNet in bf16 (what fits this machine; set --resolution, e.g. 1024 for SDXL's own); anima, "
                        "krea2: the random DiTs through the stock loaders (Anima bf16 at its exact size, Krea 2 with "
                        "fp8 weights and 2 of its 28 blocks)")
    p.add_argument("--krea2-blocks", type=int, default=2,
                   help="blocks of the random Krea 2 (default the tests' 2; its training memory grows per block)")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                   help="UNet weights; default fp32 for sd15, bf16 for sdxl")
    p.add_argument("--resolution", type=int, default=512, help="image side in px; default 512 (paper)")
    p.add_argument("--batch", type=int, default=4, help="images per step; default 4 (paper)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per trainer (plus 1 warm-up); default 2")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave torch's default)")
    p.add_argument("--attention", default="pytorch", choices=["pytorch", "default"],
                   help="pytorch: torch's fused attention, as ComfyUI runs on NVIDIA GPUs (default); default: "
                        "ComfyUI's CPU choice, sub-quadratic attention that keeps the N×N scores for backward")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the figures to FILE as JSON")
    p.add_argument("--only", choices=TRAINERS, default=None, help=argparse.SUPPRESS)  # one child's trainer
    return p.parse_args()


def train_node(model, clip, vae, images, resolution: int, batch: int, steps: int, checkpointing: bool, seed: int = 0):
    return bc.run_node("PerResTrainResiduals", model=model, clip=clip, vae=vae, images=images, identifier="sks",
                       class_word="dog", steps=steps, batch_size=batch, learning_rate=1e-3, rank_ratio=0.05,
                       resolution=resolution, seed=seed, init="random", gradient_checkpointing=checkpointing)


def precision(opts: argparse.Namespace) -> str:
    return opts.precision or ("fp32" if opts.family == "sd15" else "bf16")


def measure(name: str, model, clip, vae, images, latents, conditioning, opts) -> dict:
    """Seconds per step and extra peak memory of one trainer."""
    clock = bc.StepClock()
    with bc.optimizer_steps(clock), bc.TrainingPeak(model.model.diffusion_model) as peak:
        t0 = time.perf_counter()
        if name == "bound":
            run_bound(model, latents, conditioning, opts.batch, opts.steps, seed=0, clock=clock)
            durations = clock.durations()  # the bound restarts its clock after its warm-up step
        else:
            train_node(model, clip, vae, images, opts.resolution, opts.batch, opts.steps + 1, name == "ckpt")
            durations = clock.durations()  # intervals between optimizer steps: steps 2..N
        total = time.perf_counter() - t0
    return {"seconds_per_step": bc.median(durations), "step_seconds": durations,
            "cpu_seconds_per_step": bc.median(clock.cpu_durations()), "total_seconds": total,
            "extra_peak_bytes": peak.extra_bytes, "cuda_peak_allocated_bytes": peak.cuda_total_peak}


def run_one(opts: argparse.Namespace) -> dict:
    """In a child process: load the model and measure the trainer opts.only."""
    model, clip, vae = bc.load_model(opts.family, opts.device, opts.threads, precision(opts), opts.attention,
                                     krea2_blocks=opts.krea2_blocks)
    images = make_images(opts.batch, opts.resolution)
    latents = bc.image_latents(model, vae, images)
    conditioning = bc.pack_module("nodes.host.training").caption_conditioning(
        model, clip, "a photo of a sks dog", opts.resolution, opts.resolution)
    # One tiny run first: the first training on a model swaps its inference-tensor weights for ordinary
    # ones once (nodes/host/training.frozen_for_backward); that one-off copy must not count as a peak.
    train_node(model, clip, vae, make_images(1, 64), 64, 1, 1, False)
    result = measure(opts.only, model, clip, vae, images, latents, conditioning, opts)
    result["unet_dtype"] = str(model.model.get_dtype())
    return result


# glibc: blocks of 128 KiB and more are mmapped and unmapped on free, so RSS tracks live memory
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def run_child(opts: argparse.Namespace, name: str, extra_env: dict) -> dict:
    import subprocess
    args = [sys.executable, os.path.abspath(__file__), "--only", name, "--family", opts.family,
            "--precision", precision(opts), "--resolution", str(opts.resolution),
            "--batch", str(opts.batch), "--steps", str(opts.steps), "--device", opts.device,
            "--threads", str(opts.threads), "--attention", opts.attention, "--krea2-blocks", str(opts.krea2_blocks)]
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
        bc.say(f"  {name:5s}: {r['seconds_per_step']:.2f} s/step (steps "
               f"{', '.join(f'{d:.2f}' for d in r['step_seconds'])}), extra peak {bc.gib(r['extra_peak_bytes'])}"
               + (f" (RSS with glibc's default threshold: {bc.gib(r['extra_peak_bytes_default_malloc'])})"
                  if opts.device == "cpu" else ""))
    return results


def main() -> None:
    opts = parse_args()
    if opts.only:
        bc.say("RESULT " + json.dumps(run_one(opts)))
        return
    say = bc.say
    say(f"settings: {opts.resolution} px, batch {opts.batch}, {opts.steps} timed steps (+1 warm-up) per trainer, "
        f"device {opts.device}, fresh child processes per trainer; {bc.load_note()}")
    results = run_children(opts)
    bound, plain, ckpt = (results[n] for n in TRAINERS)
    ratios = {
        "memory_cut": plain["extra_peak_bytes"] / max(ckpt["extra_peak_bytes"], 1),
        "checkpointing_time_cost": ckpt["seconds_per_step"] / plain["seconds_per_step"],
        "plain_over_bound": plain["seconds_per_step"] / bound["seconds_per_step"],
        "checkpointing_cpu_cost": ckpt["cpu_seconds_per_step"] / plain["cpu_seconds_per_step"],
        "plain_over_bound_cpu": plain["cpu_seconds_per_step"] / bound["cpu_seconds_per_step"],
    }
    say("")
    say("=" * 78)
    bc.say_settings(opts, "per training step and peak memory above the loaded model: the frozen-UNet bound, "
                            "PerRes without and with gradient checkpointing")
    say(f"PAPER SCALE  {opts.family}  {opts.resolution} px  batch {opts.batch}  UNet {plain['unet_dtype']}  device {opts.device}")
    say(f"  {'trainer':22s} {'s/step':>8s} {'cpu s/step':>11s} {'extra peak':>12s}")
    labels = {"bound": "frozen-UNet bound", "plain": "PerRes, no checkpoint", "ckpt": "PerRes, checkpointing"}
    for name in TRAINERS:
        r = results[name]
        say(f"  {labels[name]:22s} {r['seconds_per_step']:8.2f} {r['cpu_seconds_per_step']:11.2f} "
            f"{bc.gib(r['extra_peak_bytes']):>12s}")
    say(f"  extra peak plain / ckpt = {ratios['memory_cut']:.2f}   (target >= 3: "
        f"{'OK' if ratios['memory_cut'] >= 3 else 'UNDER TARGET'})")
    say(f"  s/step ckpt / plain     = {ratios['checkpointing_time_cost']:.3f} wall, "
        f"{ratios['checkpointing_cpu_cost']:.3f} cpu  (target <= 1.4: {bc.verdict(ratios['checkpointing_time_cost'], 1.4)} wall)")
    say(f"  s/step plain / bound    = {ratios['plain_over_bound']:.3f} wall, "
        f"{ratios['plain_over_bound_cpu']:.3f} cpu  (target <= 1.10: {bc.verdict(ratios['plain_over_bound'], 1.10)} wall)")
    say(f"  ({bc.load_note()}; on a busy machine trust the cpu ratios more)")
    say("=" * 78)
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as handle:
            json.dump({"settings": vars(opts), "results": results, "ratios": ratios}, handle, indent=2)


if __name__ == "__main__":
    main()
