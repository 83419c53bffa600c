"""Per-step training time: PerRes Train Residuals vs. the frozen-UNet bound (one row per gradient-checkpointing
setting) vs. ComfyUI's TrainLoraNode, on the tests' random checkpoint. Targets: perres/bound <= 1.10; perres/stock
<= 0.20 (0.5 on the DiTs). benchmarks/README.md, "bench_training.py".

Run from the pack root:  python benchmarks/bench_training.py [--family sd15] [--resolution 64] [--batch 4] [--steps 5]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
import harness as h  # noqa: E402

CAPTION = "a photo of a sks dog"


def parse_args() -> argparse.Namespace:
    p = h.arguments(__doc__, profile=True, resolution=64, batch=4, rounds=2, stock_rank=8)
    p.add_argument("--family", default="sd15", choices=bc.FAMILY_CHOICES,
                   help="the tests' random model: sd15 (default, fp32), sdxl, anima or krea2 (bf16)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per PerRes/bound run (plus 1 warm-up)")
    p.add_argument("--checkpointing", default="off,on",
                   help="gradient checkpointing settings to compare, one row each: off, on or off,on (default)")
    p.add_argument("--stock-steps", type=int, default=3, help="TrainLoraNode steps (first one is warm-up); 0 skips it")
    p.add_argument("--stock-no-checkpointing", action="store_true",
                   help="TrainLoraNode with gradient_checkpointing=False (its default is True)")
    opts = p.parse_args()
    opts.checkpointing = [name == "on" for name in h.choices(p, "--checkpointing", opts.checkpointing, {"on", "off"})]
    return opts


def run_bound(model, latents, conditioning, batch: int, steps: int, seed: int, clock: h.StepClock,
              checkpointing: bool = False):
    """Frozen-denoiser forward + backward, AdamW on the family's residuals only, no ComfyUI in the loop;
    `conditioning` from nodes.host.training.caption_conditioning; `checkpointing` recomputes what PerRes does."""
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


def precision(opts: argparse.Namespace) -> str:
    """fp32 for SD1.5 (the CPU figures compare like with like), bf16 for the larger models."""
    return "fp32" if opts.family == "sd15" else "bf16"


def main() -> None:
    opts = parse_args()
    model, clip, vae = bc.load_model(opts.family, opts.device, opts.threads, precision(opts))
    say = h.say
    images = bc.make_images(opts.batch, opts.resolution)
    latents = {"samples": bc.image_latents(model, vae, images)}  # one latent per image, as PerRes encodes them
    positive = bc.encode(clip, CAPTION)
    conditioning = bc.pack_module("nodes.host.training").caption_conditioning(model, clip, CAPTION, opts.resolution,
                                                                                 opts.resolution)
    say(f"model dtype {model.model.get_dtype()}, manual_cast {model.model.manual_cast_dtype}, "
        f"load device {model.load_device}; images {tuple(images.shape)}, latents {tuple(latents['samples'].shape)}")
    say(f"settings: resolution {opts.resolution}, batch {opts.batch}, {opts.steps} timed steps "
        f"(+1 warm-up) x {opts.rounds} rounds, {precision(opts)}, device {opts.device}; {h.load_note()}")

    clock = h.StepClock()

    def run_perres(seed: int, checkpointing: bool):
        # steps + 1 optimizer steps: the intervals between them are the timed ones
        return bc.train_perres(model, clip, vae, images, opts.steps + 1, opts.batch, opts.resolution, seed,
                               gradient_checkpointing=checkpointing)

    # keyed by (kind, checkpointing): kind is "bound", "perres" or "stock"
    rows: dict[bool, dict[str, h.Series]] = {}
    memory: dict[tuple, h.Measure] = {}
    outside: dict[bool, list[float]] = {}
    stock_key, stock, stock_failure = ("stock", not opts.stock_no_checkpointing), None, None
    with h.optimizer_steps(clock):
        for checkpointing in opts.checkpointing:
            seeds = {"bound": 0, "perres": 0}

            def trainer(name: str, checkpointing: bool = checkpointing):
                def run():
                    seeds[name] += 1  # the round's seed, as in every earlier run of this benchmark
                    if name == "bound":
                        return run_bound(model, latents["samples"], conditioning, opts.batch, opts.steps,
                                         seed=seeds[name] - 1, clock=clock, checkpointing=checkpointing)
                    return run_perres(seeds[name] - 1, checkpointing)
                return run

            def collect(name: str, run: h.Measure, checkpointing: bool = checkpointing) -> str:
                memory.setdefault((name, checkpointing), run)
                if name == "bound":
                    return ""
                # the bound restarts its clock after its warm-up step; perres runs steps+1 optimizer steps
                outside.setdefault(checkpointing, []).append(run.seconds - sum(clock.durations()))
                return f"(node call {run.seconds:.2f} s, {outside[checkpointing][-1]:.2f} s outside the timed steps)"

            rows[checkpointing] = h.interleaved({"bound": trainer("bound"), "perres": trainer("perres")},
                                                opts.rounds, clock=clock, after=collect, warmup=False,
                                                label=h.row(checkpointing), memory=True)

        if opts.stock_steps > 0:
            clock.reset()
            try:
                with h.Measure() as stock:  # its settings; the host's own defaults for the rest
                    bc.run_stock_trainer(bc.stock_trainer_inputs({
                        "model": model, "latents": latents, "positive": positive,
                        "batch_size": opts.batch, "steps": opts.stock_steps, "learning_rate": 5e-4,
                        "rank": opts.stock_rank, "seed": 0, "training_dtype": precision(opts), "lora_dtype": "fp32",
                        "gradient_checkpointing": stock_key[1]}))
            except Exception as error:  # the host's trainer cannot train every model (Anima on 0.33.0)
                stock_failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                stock = None
                say(f"[stock] TrainLoraNode failed: {stock_failure}")
            else:
                memory[stock_key] = stock
                stock_steps, stock_cpu = clock.durations(), clock.cpu_durations()
                say(f"[stock] TrainLoraNode call {stock.seconds:.2f} s for {opts.stock_steps} steps; between "
                    f"optimizer steps: wall {' '.join(f'{d:.3f}' for d in stock_steps)}")

    if opts.profile:
        h.profiled(lambda: run_perres(99, opts.checkpointing[-1]), opts.profile, "cumulative")

    record = h.Record("bench_training", opts,
                      "per optimizer step, the PerRes node vs the frozen-UNet bound with the same gradient "
                      "checkpointing (one row per setting), and the PerRes node vs ComfyUI's TrainLoraNode",
                      opts.device, note=f"{opts.resolution} px, batch {opts.batch}", family=opts.family)
    for checkpointing, runs in rows.items():
        bound, perres = runs["bound"], runs["perres"]
        say(f"  -- {h.row(checkpointing)} (PerRes node and bound alike)")
        bound.describe("(b) bound", 10)
        perres.describe("(a) perres", 10)
        say(f"      perres node call total: {h.spread(perres.totals)}")
        say(f"      outside the timed steps (VAE+CLIP encode, setup, warm-up step, copy-out): "
            f"{h.spread(outside[checkpointing])}")
        on = "on" if checkpointing else "off"
        record.ratio(f"perres/bound, checkpointing {on}", perres.step / bound.step, 1.10,
                     f"PerRes step / bound, checkpointing {on} both",
                     detail=f"({perres.step:.2f} vs {bound.step:.2f} s/step; "
                            f"cpu {perres.cpu_step / bound.cpu_step:.3f})")
        record.figure(f"seconds_per_step_checkpointing_{on}", {"perres": perres.step, "bound": bound.step})
    if stock_failure is not None:
        say(f"  -- (c) stock: TrainLoraNode could not train this model here: {stock_failure}")
    target = 0.5 if opts.family in bc.DIT_FAMILIES else 0.20
    if stock is not None:
        per_step = stock.seconds / opts.stock_steps
        say(f"  -- (c) stock: rank {opts.stock_rank}, {precision(opts)}, AdamW, {h.row(stock_key[1])}, every "
            f"layer trained; {opts.batch} cond entries x latent batch {opts.batch} = {opts.batch * opts.batch} "
            f"UNet samples per step (calc_cond_batch)")
        say(f"      s/step wall: {per_step:.3f} (node total / steps: setup and warm-up step included)")
        say(f"      between optimizer steps wall: {h.spread(stock_steps)}")
        say(f"                              cpu:  {h.spread(stock_cpu)}")
        record.figure("stock_seconds_per_step", per_step)
    perres = rows.get(stock_key[1], {}).get("perres")
    if stock_failure is not None or (stock is not None and perres is not None):
        record.ratio(f"perres/stock, {h.row(stock_key[1])}", perres.step / per_step if stock else None, target,
                     f"PerRes step / TrainLoraNode, {h.row(stock_key[1])} both",
                     detail=f"(stock {per_step:.1f} s/step)" if stock else "",
                     note="" if stock else f"TrainLoraNode cannot train this model here ({stock_failure})")
    if stock is not None and perres is not None and stock_steps:
        say(f"  perres/stock between-step = {perres.step / h.median(stock_steps):.3f} wall, "
            f"{perres.cpu_step / h.median(stock_cpu):.3f} cpu (stock = total/steps above)")
    for key, peak in memory.items():
        say(f"  memory {key[0]:6s} {h.row(key[1]):17s}: {peak.describe()}")
        record.figure(f"peak_rss_growth_bytes_{key[0]}_{h.row(key[1]).replace(' ', '_')}",
                      peak.peak_rss - peak.start_rss)
    say(f"  process peak RSS (ru_maxrss): {h.process_peak_rss()}")
    record.finish(opts.json)


if __name__ == "__main__":
    main()
