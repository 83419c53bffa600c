"""Per-step training time: PerRes Train Residuals vs. the plain-UNet bound vs. ComfyUI's TrainLoraNode.

One run, one model (the tests' random-weight SD1.5 checkpoint, fp32; with --family anima or krea2 the random
DiT through the stock loaders, bf16 compute), one batch and resolution, and one row per gradient-checkpointing
setting (--checkpointing off,on: both by default), each comparing

  (a) perres  the PerResTrainResiduals node executed as ComfyUI executes it (inference mode, real
              ModelPatcher), with that gradient_checkpointing; VAE/CLIP encoding and the first (warm-up)
              optimizer step are excluded;
  (b) bound   the frozen UNet module called directly, forward + backward + AdamW on the same 16
              residual modules through the pack's own proj_out hooks, base weights requires_grad=False,
              with the same modules recomputed in backward when that row checkpoints,

and, once per run,
  (c) stock   ComfyUI's TrainLoraNode (comfy_extras/nodes_train.py), rank 8, in the run's precision, on
              latents from VAEEncode and conditioning from CLIPTextEncode (target: PerRes at most 0.20× its
              step on SD1.5, 0.5× on the DiTs, where every layer it trains is far wider).

Per-step times come from a process-wide torch optimizer step post-hook, so all three are timed the
same way: the duration between consecutive optimizer steps (steps 2..N of each run). bound and
perres alternate for --rounds rounds to spread noise; medians are reported.

Run from the pack root:  python benchmarks/bench_training.py [--family sd15] [--resolution 64] [--batch 4] [--steps 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

CAPTION = "a photo of a sks dog"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="sd15", choices=bc.FAMILY_CHOICES,
                   help="the tests' random model: sd15 (default, fp32), sdxl, anima or krea2 (bf16)")
    p.add_argument("--resolution", type=int, default=64, help="image side in px (latent = /8); default 64")
    p.add_argument("--batch", type=int, default=4, help="images per step; default 4 (paper)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per PerRes/bound run (plus 1 warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="alternating bound/perres rounds; default 2")
    p.add_argument("--checkpointing", default="off,on",
                   help="gradient checkpointing settings to compare, one row each: off, on or off,on (default)")
    p.add_argument("--stock-steps", type=int, default=3, help="TrainLoraNode steps (first one is warm-up); 0 skips it")
    p.add_argument("--stock-rank", type=int, default=8)
    p.add_argument("--stock-no-checkpointing", action="store_true",
                   help="TrainLoraNode with gradient_checkpointing=False (its default is True)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave torch's default)")
    p.add_argument("--profile", metavar="FILE", default=None,
                   help="also profile one extra PerRes node run with cProfile and write the stats to FILE")
    opts = p.parse_args()
    names = [name.strip() for name in opts.checkpointing.split(",") if name.strip()]
    if not names or set(names) - {"off", "on"}:
        p.error(f"--checkpointing takes off, on or off,on; got {opts.checkpointing!r}")
    opts.checkpointing = [name == "on" for name in names]
    return opts


def make_images(batch: int, resolution: int):
    import torch
    g = torch.Generator().manual_seed(1)
    images = torch.rand(batch, resolution, resolution, 3, generator=g) * 0.3
    lo, hi = resolution // 4, 3 * resolution // 4
    images[:, lo:hi, lo:hi, 0] = 0.9
    return images


def run_bound(model, latents, conditioning, batch: int, steps: int, seed: int, clock: bc.StepClock,
              checkpointing: bool = False):
    """Plain frozen-denoiser forward + backward, AdamW on the residuals only (no ComfyUI in the loop), for the
    model's family (SD1.x: 16 residuals; SDXL: 11, with its ADM vector; the DiTs' block outputs, with their
    flow target); `conditioning` is the caption's (nodes.host.training.caption_conditioning). With
    `checkpointing`, the modules PerRes recomputes in backward (nodes.host.training.checkpoint_units) are
    recomputed here too."""
    import torch
    import torch.nn.functional as F
    import comfy.model_management as mm

    residual = bc.pack_module("perres_core.residual")
    training = bc.pack_module("perres_core.training")
    host = bc.pack_module("nodes.host.training")
    hooks = bc.pack_module("nodes.host.residual_hooks")

    with torch.inference_mode(False), torch.enable_grad():
        mm.load_models_gpu([model], force_full_load=True)
        device = model.load_device
        unet = model.model.diffusion_model
        x0_all = host.model_latents(model.model, host.image_latents(latents, model)).to(device)
        dtype = host.training_dtype(model.model)
        rows = conditioning.select(torch.zeros(batch, dtype=torch.long)).to(device, dtype)
        host_model = bc.pack_module("nodes.host.model")
        family, schedule = host_model.family_of_model(model), host_model.diffusion_schedule(model)
        residuals = residual.ResidualSet.for_family(family, residual.DEFAULT_RANK_RATIO,
                                                    host_model.unet_config_of(model))
        residuals.initialize("random", seed)
        for layer in residuals.layers.values():
            layer.to(device).requires_grad_(True)
        optimizer = torch.optim.AdamW(list(residuals.parameters()), lr=1e-3, weight_decay=1e-2)
        gen = torch.Generator(device=device).manual_seed(seed)
        recompute = bc.pack_module("perres_core.grad_checkpoint").recompute_in_backward
        units = host.checkpoint_units(unet) if checkpointing else []
        predict = host.denoiser_prediction(model.model)
        kernels = bc.pack_module("nodes.host.differentiable_kernels").differentiable_host_kernels
        with host.frozen_for_backward(unet), hooks.residual_hooks(unet, residuals.layers), \
                recompute(units), kernels():
            assert not any(p.requires_grad for p in unet.parameters())
            for step in range(steps + 1):
                if step == 1:
                    clock.reset()  # drop everything up to the end of the warm-up step
                    clock.tick()
                index = torch.randint(0, x0_all.shape[0], (batch,), generator=gen, device=device)
                x0 = x0_all[index]
                t = torch.randint(0, schedule.num_timesteps, (batch,), generator=gen, device=device)
                noise = torch.randn(x0.shape, generator=gen, device=device)
                x_t = training.noisy_latents(x0, noise, t, schedule)
                output = predict(x_t.to(dtype), t, rows)
                loss = F.mse_loss(output.float(), schedule.target(x0, noise, t))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        for layer in residuals.layers.values():
            layer.requires_grad_(False)
    return residuals.parameter_count()


def run_perres(model, clip, vae, images, batch: int, steps: int, resolution: int, seed: int,
               checkpointing: bool = True):
    return bc.run_node("PerResTrainResiduals", model=model, clip=clip, vae=vae, images=images, identifier="sks",
                       class_word="dog", steps=steps + 1, batch_size=batch, learning_rate=1e-3, rank_ratio=0.05,
                       resolution=resolution, seed=seed, init="random", gradient_checkpointing=checkpointing)


def run_stock(model, latents, positive, batch: int, steps: int, rank: int, checkpointing: bool, seed: int,
              training_dtype: str = "fp32"):
    """TrainLoraNode with these settings, the host's own defaults for the rest."""
    return bc.run_stock_trainer(bc.stock_trainer_inputs({
        "model": model, "latents": latents, "positive": positive, "batch_size": batch, "steps": steps,
        "learning_rate": 5e-4, "rank": rank, "seed": seed, "training_dtype": training_dtype, "lora_dtype": "fp32",
        "gradient_checkpointing": checkpointing}))


def precision(opts: argparse.Namespace) -> str:
    """fp32 for SD1.5 (the CPU figures compare like with like), bf16 for the larger models."""
    return "fp32" if opts.family == "sd15" else "bf16"


def main() -> None:
    opts = parse_args()
    model, clip, vae = bc.load_model(opts.family, opts.device, opts.threads, precision(opts))
    import torch
    say = bc.say
    images = make_images(opts.batch, opts.resolution)
    latents = {"samples": bc.image_latents(model, vae, images)}  # one latent per image, as PerRes encodes them
    positive = bc.run_node("CLIPTextEncode", clip=clip, text=CAPTION)[0]
    conditioning = bc.pack_module("nodes.host.training").caption_conditioning(model, clip, CAPTION, opts.resolution,
                                                                                 opts.resolution)
    say(f"model dtype {model.model.get_dtype()}, manual_cast {model.model.manual_cast_dtype}, "
        f"load device {model.load_device}; images {tuple(images.shape)}, latents {tuple(latents['samples'].shape)}")
    say(f"settings: resolution {opts.resolution}, batch {opts.batch}, {opts.steps} timed steps "
        f"(+1 warm-up) x {opts.rounds} rounds, {precision(opts)}, device {opts.device}, torch threads "
        f"{torch.get_num_threads()}; "
        f"{bc.load_note()}")

    def fmt(values):
        return " ".join(f"{d:.3f}" for d in values)

    def row(checkpointing: bool) -> str:
        return f"checkpointing {'on' if checkpointing else 'off'}"

    clock = bc.StepClock()
    segments = bc.Segments()
    # keyed by (kind, checkpointing): kind is "bound", "perres" or "stock"
    breakdown: dict[tuple, list[dict]] = {}
    wall: dict[tuple, list[float]] = {}
    cpu: dict[tuple, list[float]] = {}
    perres_totals: dict[bool, list[float]] = {}
    perres_outside: dict[bool, list[float]] = {}
    mem: dict[tuple, bc.PeakMemory] = {}
    stock_key, stock_total, stock_failure = ("stock", not opts.stock_no_checkpointing), None, None
    with bc.optimizer_steps(clock), bc.segment_marks(segments, model.model.diffusion_model):
        for checkpointing in opts.checkpointing:
            for r in range(opts.rounds):
                # alternate which one goes first, so drifting machine load does not favour either
                for name in (("bound", "perres") if r % 2 == 0 else ("perres", "bound")):
                    key = (name, checkpointing)
                    clock.reset()
                    segments.reset()
                    t0 = time.perf_counter()
                    with bc.PeakMemory() as m:
                        if name == "bound":
                            params = run_bound(model, latents["samples"], conditioning, opts.batch, opts.steps,
                                               seed=r, clock=clock, checkpointing=checkpointing)
                        else:
                            run_perres(model, clip, vae, images, opts.batch, opts.steps, opts.resolution, seed=r,
                                       checkpointing=checkpointing)
                    total = time.perf_counter() - t0
                    mem.setdefault(key, m)
                    # bound: the clock restarts after its warm-up step; perres runs steps+1 optimizer steps, and
                    # the intervals between them are steps 2..N
                    durations, cpu_durations = clock.durations(), clock.cpu_durations()
                    breakdown.setdefault(key, []).append(segments.per_step())
                    wall.setdefault(key, []).extend(durations)
                    cpu.setdefault(key, []).extend(cpu_durations)
                    note = f"({params} trained params)" if name == "bound" else \
                        f"(node call {total:.2f} s, {total - sum(durations):.2f} s of it outside the timed steps)"
                    if name == "perres":
                        perres_totals.setdefault(checkpointing, []).append(total)
                        perres_outside.setdefault(checkpointing, []).append(total - sum(durations))
                    say(f"[{row(checkpointing)}, round {r + 1}] {name:6s} s/step wall {fmt(durations)} | "
                        f"cpu {fmt(cpu_durations)}  {note}")

        if opts.stock_steps > 0:
            clock.reset()
            segments.reset()
            t0 = time.perf_counter()
            try:
                with bc.PeakMemory() as m:
                    run_stock(model, latents, positive, opts.batch, opts.stock_steps, opts.stock_rank,
                              stock_key[1], seed=0, training_dtype=precision(opts))
            except Exception as error:  # the host's trainer cannot train every model (Anima on 0.33.0)
                stock_failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                say(f"[stock] TrainLoraNode failed: {stock_failure}")
            else:
                stock_total = time.perf_counter() - t0
                mem[stock_key] = m
                wall[stock_key] = clock.durations()
                breakdown[stock_key] = [segments.per_step()]
                cpu[stock_key] = clock.cpu_durations()
                say(f"[stock] TrainLoraNode call {stock_total:.2f} s for {opts.stock_steps} steps; between "
                    f"optimizer steps: wall {fmt(wall[stock_key])} | cpu {fmt(cpu[stock_key])}")

    if opts.profile:
        import cProfile
        import pstats
        profiler = cProfile.Profile()
        profiler.enable()
        run_perres(model, clip, vae, images, opts.batch, opts.steps, opts.resolution, seed=99,
                   checkpointing=opts.checkpointing[-1])
        profiler.disable()
        profiler.dump_stats(opts.profile)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)

    say("")
    say("=" * 78)
    bc.say_settings(opts, "per optimizer step, the PerRes node vs the frozen-UNet bound with the same gradient "
                            "checkpointing (one row per setting), and the PerRes node vs ComfyUI's TrainLoraNode")
    say(f"TRAINING  {opts.family}  ComfyUI {bc.comfy_version('')}  resolution {opts.resolution}px  batch {opts.batch}  "
        f"{precision(opts)}  "
        f"device {opts.device}  torch threads {torch.get_num_threads()}")
    say(f"  {bc.load_note()}")
    for checkpointing in opts.checkpointing:
        perres_key, bound_key = ("perres", checkpointing), ("bound", checkpointing)
        perres, bound = bc.median(wall[perres_key]), bc.median(wall[bound_key])
        perres_cpu, bound_cpu = bc.median(cpu[perres_key]), bc.median(cpu[bound_key])
        say(f"  -- {row(checkpointing)} (PerRes node and bound alike)")
        say(f"  (b) bound  s/step wall: {bc.spread(wall[bound_key])}")
        say(f"                    cpu:  {bc.spread(cpu[bound_key])}")
        say(f"  (a) perres s/step wall: {bc.spread(wall[perres_key])}")
        say(f"                    cpu:  {bc.spread(cpu[perres_key])}")
        say(f"      perres node call total: {bc.spread(perres_totals[checkpointing])}")
        say(f"      outside the timed steps (VAE+CLIP encode, setup, warm-up step, copy-out): "
            f"{bc.spread(perres_outside[checkpointing])}")
        say(f"  perres/bound = {perres / bound:.3f} wall, {perres_cpu / bound_cpu:.3f} cpu   "
            f"(target <= 1.10: {bc.verdict(perres / bound, 1.10)} wall)")
        report_glue(breakdown, checkpointing)
    if stock_failure is not None:
        say(f"  -- (c) stock: TrainLoraNode could not train this model here: {stock_failure}")
    if stock_total is not None:
        stock = stock_total / opts.stock_steps
        say(f"  -- (c) stock: rank {opts.stock_rank}, {precision(opts)}, AdamW, {row(stock_key[1])}, every "
            f"layer trained; {opts.batch} cond entries x latent batch {opts.batch} = {opts.batch * opts.batch} "
            f"UNet samples per step (calc_cond_batch)")
        say(f"      s/step wall: {stock:.3f} (node total / steps: setup and warm-up step included)")
        say(f"      between optimizer steps wall: {bc.spread(wall[stock_key])}")
        say(f"                              cpu:  {bc.spread(cpu[stock_key])}")
        matching = ("perres", stock_key[1])
        if matching in wall:
            perres = bc.median(wall[matching])
            target = 0.5 if opts.family in bc.DIT_FAMILIES else 0.20
            say(f"  perres/stock ({row(stock_key[1])} both) = {perres / stock:.3f} wall (stock = total/steps)   "
                f"(target <= {target:.2f}: {bc.verdict(perres / stock, target)})")
            if wall[stock_key]:
                say(f"  perres/stock between-step = {perres / bc.median(wall[stock_key]):.3f} wall, "
                    f"{bc.median(cpu[matching]) / bc.median(cpu[stock_key]):.3f} cpu")
    say("  where a step goes (median per step over runs, wall / cpu seconds):")
    for key, runs in breakdown.items():
        runs = [b for b in runs if b]
        if not runs:
            continue
        parts = []
        for seg in ("glue", "forward", "between UNet calls", "loss+backward", "optimizer"):
            values = [b[seg] for b in runs if seg in b]
            if values:
                parts.append(f"{seg} {bc.median([v[0] for v in values]):.3f}/{bc.median([v[1] for v in values]):.3f}")
        say(f"    {key[0]:6s} {row(key[1]):17s}: " + ", ".join(parts))
    for key, peak in mem.items():
        say(f"  memory {key[0]:6s} {row(key[1]):17s}: {peak.describe()}")
    say(f"  process peak RSS (ru_maxrss): {bc.process_peak_rss()}")
    say("=" * 78)


def report_glue(breakdown: dict, checkpointing: bool) -> None:
    """The contention-proof estimate: the bound's UNet work plus each one's glue (CPU seconds)."""
    glue, work = {}, {}
    for name in ("bound", "perres"):
        runs = [b for b in breakdown.get((name, checkpointing), []) if b]
        glue[name] = bc.median([b["glue"][1] for b in runs if "glue" in b])
        work[name] = bc.median([sum(v[1] for k, v in b.items() if k != "glue") for b in runs])
    if all(v == v and v > 0 for v in (*glue.values(), *work.values())):  # v == v: not NaN
        bc.say(f"  perres glue costs {glue['perres'] * 1000:.1f} ms/step vs {glue['bound'] * 1000:.1f} ms for the "
               f"bound: perres/bound from the breakdown (bound's UNet+backward+optimizer work, perres's glue) = "
               f"{(work['bound'] + glue['perres']) / (work['bound'] + glue['bound']):.3f} (contention-proof estimate)")


if __name__ == "__main__":
    main()
