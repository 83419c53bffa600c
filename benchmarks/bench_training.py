"""Per-step training time: PerRes Train Residuals vs. the plain-UNet bound vs. ComfyUI's TrainLoraNode.

One run, one model (the tests' random-weight SD1.5 checkpoint, fp32), one batch and resolution:

  (a) perres  the PerResTrainResiduals node executed as ComfyUI executes it (inference mode, real
              ModelPatcher); VAE/CLIP encoding and the first (warm-up) optimizer step are excluded.
  (b) bound   the frozen UNet module called directly, forward + backward + AdamW on the same 16
              residual modules through the pack's own proj_out hooks, base weights requires_grad=False.
  (c) stock   ComfyUI's TrainLoraNode (comfy_extras/nodes_train.py), rank 8, fp32, on latents from
              VAEEncode and conditioning from CLIPTextEncode.

Per-step times come from a process-wide torch optimizer step post-hook, so all three are timed the
same way: the duration between consecutive optimizer steps (steps 2..N of each run). bound and
perres alternate for --rounds rounds to spread noise; medians are reported.

Run from the pack root:  python benchmarks/bench_training.py [--resolution 64] [--batch 4] [--steps 5]
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
    p.add_argument("--resolution", type=int, default=64, help="image side in px (latent = /8); default 64")
    p.add_argument("--batch", type=int, default=4, help="images per step; default 4 (paper)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per PerRes/bound run (plus 1 warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="alternating bound/perres rounds; default 2")
    p.add_argument("--stock-steps", type=int, default=3, help="TrainLoraNode steps (first one is warm-up); 0 skips it")
    p.add_argument("--stock-rank", type=int, default=8)
    p.add_argument("--stock-no-checkpointing", action="store_true",
                   help="TrainLoraNode with gradient_checkpointing=False (its default is True)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave torch's default)")
    p.add_argument("--profile", metavar="FILE", default=None,
                   help="also profile one extra PerRes node run with cProfile and write the stats to FILE")
    return p.parse_args()


def make_images(batch: int, resolution: int):
    import torch
    g = torch.Generator().manual_seed(1)
    images = torch.rand(batch, resolution, resolution, 3, generator=g) * 0.3
    lo, hi = resolution // 4, 3 * resolution // 4
    images[:, lo:hi, lo:hi, 0] = 0.9
    return images


def run_bound(model, latents, conditioning, batch: int, steps: int, seed: int, clock: bc.StepClock):
    """Plain frozen-UNet forward + backward, AdamW on the residuals only (no ComfyUI in the loop), for the
    model's family (SD1.x: 16 residuals; SDXL: 11, with its ADM vector); `conditioning` is the caption's
    (nodes.host.training.caption_conditioning)."""
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
        x0_all = model.model.process_latent_in(latents.clone().float()).to(device)
        dtype = host.training_dtype(model.model)
        rows = conditioning.select(torch.zeros(batch, dtype=torch.long)).to(device, dtype)
        host_model = bc.pack_module("nodes.host.model")
        family, schedule = host_model.family_of_model(model), host_model.diffusion_schedule(model)
        residuals = residual.ResidualSet.for_family(family, residual.DEFAULT_RANK_RATIO)
        residuals.initialize("random", seed)
        for layer in residuals.layers.values():
            layer.to(device).requires_grad_(True)
        optimizer = torch.optim.AdamW(list(residuals.parameters()), lr=1e-3, weight_decay=1e-2)
        gen = torch.Generator(device=device).manual_seed(seed)
        with host.frozen_for_backward(unet), hooks.proj_out_hooks(unet, family, hooks.full_residual(residuals.layers)):
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
                output = unet(x_t.to(dtype), t.float(), context=rows.context, y=rows.vector)
                loss = F.mse_loss(output.float(), schedule.target(x0, noise, t))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        for layer in residuals.layers.values():
            layer.requires_grad_(False)
    return residuals.parameter_count()


def run_perres(model, clip, vae, images, batch: int, steps: int, resolution: int, seed: int):
    return bc.run_node("PerResTrainResiduals", model=model, clip=clip, vae=vae, images=images, identifier="sks",
                       class_word="dog", steps=steps + 1, batch_size=batch, learning_rate=1e-3, rank_ratio=0.05,
                       resolution=resolution, seed=seed, init="random")


def run_stock(model, latents, positive, batch: int, steps: int, rank: int, checkpointing: bool, seed: int):
    """TrainLoraNode with these settings and fp32, the host's own defaults for the rest."""
    return bc.run_stock_trainer(bc.stock_trainer_inputs({
        "model": model, "latents": latents, "positive": positive, "batch_size": batch, "steps": steps,
        "learning_rate": 5e-4, "rank": rank, "seed": seed, "training_dtype": "fp32", "lora_dtype": "fp32",
        "gradient_checkpointing": checkpointing}))


def main() -> None:
    opts = parse_args()
    model, clip, vae = bc.load_sd15(opts.device, opts.threads)
    import torch
    say = bc.say
    images = make_images(opts.batch, opts.resolution)
    latents = bc.run_node("VAEEncode", pixels=images, vae=vae)[0]
    positive = bc.run_node("CLIPTextEncode", clip=clip, text=CAPTION)[0]
    conditioning = bc.pack_module("nodes.host.training").caption_conditioning(model, clip, CAPTION, opts.resolution,
                                                                                 opts.resolution)
    say(f"model dtype {model.model.get_dtype()}, manual_cast {model.model.manual_cast_dtype}, "
        f"load device {model.load_device}; images {tuple(images.shape)}, latents {tuple(latents['samples'].shape)}")
    say(f"settings: resolution {opts.resolution}, batch {opts.batch}, {opts.steps} timed steps "
        f"(+1 warm-up) x {opts.rounds} rounds, fp32, device {opts.device}, torch threads {torch.get_num_threads()}; "
        f"{bc.load_note()}")

    def fmt(values):
        return " ".join(f"{d:.3f}" for d in values)

    clock = bc.StepClock()
    segments = bc.Segments()
    breakdown: dict[str, list[dict]] = {"bound": [], "perres": [], "stock": []}
    wall = {"bound": [], "perres": [], "stock": []}
    cpu = {"bound": [], "perres": [], "stock": []}
    perres_totals, perres_outside, mem = [], [], {}
    stock_total = None
    with bc.optimizer_steps(clock), bc.segment_marks(segments, model.model.diffusion_model):
        for r in range(opts.rounds):
            # alternate which one goes first, so drifting machine load does not favour either
            for name in (("bound", "perres") if r % 2 == 0 else ("perres", "bound")):
                clock.reset()
                segments.reset()
                t0 = time.perf_counter()
                with bc.PeakMemory() as m:
                    if name == "bound":
                        params = run_bound(model, latents["samples"], conditioning, opts.batch, opts.steps, seed=r,
                                           clock=clock)
                    else:
                        run_perres(model, clip, vae, images, opts.batch, opts.steps, opts.resolution, seed=r)
                total = time.perf_counter() - t0
                mem.setdefault(name, m)
                # bound: the clock restarts after its warm-up step; perres runs steps+1 optimizer steps, and
                # the intervals between them are steps 2..N
                durations, cpu_durations = clock.durations(), clock.cpu_durations()
                breakdown[name].append(segments.per_step())
                wall[name] += durations
                cpu[name] += cpu_durations
                note = f"({params} trained params)" if name == "bound" else \
                    f"(node call {total:.2f} s, {total - sum(durations):.2f} s of it outside the timed steps)"
                if name == "perres":
                    perres_totals.append(total)
                    perres_outside.append(total - sum(durations))
                say(f"[round {r + 1}] {name:6s} s/step wall {fmt(durations)} | cpu {fmt(cpu_durations)}  {note}")

        if opts.stock_steps > 0:
            clock.reset()
            segments.reset()
            t0 = time.perf_counter()
            with bc.PeakMemory() as m:
                run_stock(model, latents, positive, opts.batch, opts.stock_steps, opts.stock_rank,
                          not opts.stock_no_checkpointing, seed=0)
            stock_total = time.perf_counter() - t0
            mem["stock"] = m
            wall["stock"] = clock.durations()
            breakdown["stock"].append(segments.per_step())
            cpu["stock"] = clock.cpu_durations()
            say(f"[stock] TrainLoraNode call {stock_total:.2f} s for {opts.stock_steps} steps; between optimizer "
                f"steps: wall {fmt(wall['stock'])} | cpu {fmt(cpu['stock'])}")

    if opts.profile:
        import cProfile
        import pstats
        profiler = cProfile.Profile()
        profiler.enable()
        run_perres(model, clip, vae, images, opts.batch, opts.steps, opts.resolution, seed=99)
        profiler.disable()
        profiler.dump_stats(opts.profile)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)

    perres, bound = bc.median(wall["perres"]), bc.median(wall["bound"])
    perres_cpu, bound_cpu = bc.median(cpu["perres"]), bc.median(cpu["bound"])
    say("")
    say("=" * 78)
    say(f"TRAINING  resolution {opts.resolution}px  batch {opts.batch}  fp32  device {opts.device}  "
        f"torch threads {torch.get_num_threads()}")
    say(f"  {bc.load_note()}")
    say(f"  (b) bound  s/step wall: {bc.spread(wall['bound'])}")
    say(f"                    cpu:  {bc.spread(cpu['bound'])}")
    say(f"  (a) perres s/step wall: {bc.spread(wall['perres'])}")
    say(f"                    cpu:  {bc.spread(cpu['perres'])}")
    say(f"      perres node call total: {bc.spread(perres_totals)}")
    say(f"      outside the timed steps (VAE+CLIP encode, setup, warm-up step, copy-out): {bc.spread(perres_outside)}")
    if stock_total is not None:
        stock = stock_total / opts.stock_steps
        say(f"  (c) stock  s/step wall: {stock:.3f} (node total / steps: setup and warm-up step included)")
        say(f"      between optimizer steps wall: {bc.spread(wall['stock'])}")
        say(f"                              cpu:  {bc.spread(cpu['stock'])}")
        say(f"      stock settings: rank {opts.stock_rank}, fp32, AdamW, gradient_checkpointing="
            f"{not opts.stock_no_checkpointing}, every layer trained; {opts.batch} cond entries x latent batch "
            f"{opts.batch} = {opts.batch * opts.batch} UNet samples per step (calc_cond_batch)")
    say(f"  perres/bound = {perres / bound:.3f} wall, {perres_cpu / bound_cpu:.3f} cpu   "
        f"(target <= 1.10: {bc.verdict(perres / bound, 1.10)} wall)")
    if stock_total is not None:
        say(f"  perres/stock = {perres / stock:.3f} wall (stock = total/steps)   "
            f"(target <= 0.20: {bc.verdict(perres / stock, 0.20)})")
        if wall["stock"]:
            say(f"  perres/stock between-step = {perres / bc.median(wall['stock']):.3f} wall, "
                f"{perres_cpu / bc.median(cpu['stock']):.3f} cpu")
    say("  where a step goes (median per step over runs, wall / cpu seconds):")
    for name in ("bound", "perres", "stock"):
        runs = [b for b in breakdown[name] if b]
        if not runs:
            continue
        parts = []
        for seg in ("glue", "forward", "between UNet calls", "loss+backward", "optimizer"):
            values = [b[seg] for b in runs if seg in b]
            if values:
                parts.append(f"{seg} {bc.median([v[0] for v in values]):.3f}/{bc.median([v[1] for v in values]):.3f}")
        say(f"    {name:6s}: " + ", ".join(parts))
    glue = {name: bc.median([b["glue"][1] for b in breakdown[name] if "glue" in b]) for name in ("bound", "perres")}
    work = {name: bc.median([sum(v[1] for k, v in b.items() if k != "glue") for b in breakdown[name] if b])
            for name in ("bound", "perres")}
    if all(glue.values()) and all(work.values()):
        say(f"  perres glue costs {glue['perres'] * 1000:.1f} ms/step vs {glue['bound'] * 1000:.1f} ms for the bound: "
            f"perres/bound from the breakdown (bound's UNet+backward+optimizer work, perres's glue) = "
            f"{(work['bound'] + glue['perres']) / (work['bound'] + glue['bound']):.3f} (contention-proof estimate)")
    for name in ("bound", "perres", "stock"):
        if name in mem:
            say(f"  memory {name:6s}: {mem[name].describe()}")
    say(f"  process peak RSS (ru_maxrss): {bc.process_peak_rss()}")
    say("=" * 78)


if __name__ == "__main__":
    main()
