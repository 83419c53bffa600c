"""The paper-scale GPU check: one command, one table, one JSON file (about 5 minutes on one H100).

On the random-weight SD1.5-architecture checkpoint, with ComfyUI running the UNet in fp16 (--fp16-unet,
what SD1.5 users' GPUs run), at 512 px and batch 4:

  perres_plain   PerRes Train Residuals, 150 steps, gradient_checkpointing off
  perres_ckpt    PerRes Train Residuals, 150 steps, gradient_checkpointing on (the default)
  stock_lora     ComfyUI's TrainLoraNode on the same images, steps and batch (its own defaults otherwise:
                 rank 8, every layer, bf16 training dtype — it offers no fp16 — gradient checkpointing on)
  sample_*       50-step DDIM sampling at 512 px (CFG 6, the paper's sampler), base model, PerRes Apply
                 Residuals and PerRes LAG Sampling; one warm-up run each, then --sample-repeats timed runs
  lora_*         the same sampling with a rank-32 LoRA on every attention and feed-forward layer, merged by
                 LoraLoaderModelOnly and through PerRes LAG LoRA (benchmarks/bench_lag_lora.py on the GPU)

With --families sd15,sdxl (or sdxl) the same check runs on the random SDXL-architecture checkpoint (UNet
fp16) at 1024 px, batch 4: PerRes with and without checkpointing and TrainLoraNode, 150 steps each, and
30-step dpmpp_2m sampling with the base model, PerRes Apply Residuals, PerRes LAG Sampling and the rank-32
LoRA merged and through PerRes LAG LoRA. Targets: perres_ckpt peak <= 10 GiB at 1024 px (so 12 GB cards
train SDXL with the defaults); LAG LoRA <= 1.10x the merged LoRA.

Training figures are the node call's wall time (VAE encoding and setup included) and
torch.cuda.max_memory_allocated during the call. Targets: perres_plain 150 steps <= 30 s on an H100;
perres_ckpt peak <= 6 GiB (so 8 GB cards train with the defaults); LAG <= 1.05x Apply; LAG LoRA <= 1.25x
the merged LoRA.

    python benchmarks/gpu_check.py --json $OUT/gpu_check.json            # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --smoke                  # the same code paths, tiny, on a CPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from bench_lag_lora import attention_ff_lora, family_of, lag_lora_model, merged_lora_model  # noqa: E402
from bench_training import make_images  # noqa: E402

CAPTION = "a photo of a sks dog"
PROMPT = "a photo of a sks dog on the beach"
GIB = 1024 ** 3


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--sample-repeats", type=int, default=2)
    p.add_argument("--skip-stock", action="store_true", help="leave out ComfyUI's TrainLoraNode")
    p.add_argument("--families", default="sd15", help="comma-separated: sd15, sdxl (default sd15)")
    p.add_argument("--sdxl-resolution", type=int, default=1024)
    p.add_argument("--sdxl-sample-steps", type=int, default=30)
    p.add_argument("--smoke", action="store_true",
                   help="64 px, 2 training and 2 sampling steps: checks every code path in a minute on a CPU")
    p.add_argument("--json", metavar="FILE", default="gpu_check.json", help="where to write the figures")
    opts = p.parse_args()
    if opts.smoke:
        opts.resolution, opts.train_steps, opts.sample_steps, opts.sample_repeats = 64, 2, 2, 1
        opts.sdxl_resolution, opts.sdxl_sample_steps = 64, 2
    opts.families = [name.strip() for name in opts.families.split(",") if name.strip()]
    unknown = set(opts.families) - {"sd15", "sdxl"}
    if unknown or not opts.families:
        p.error(f"--families takes sd15 and/or sdxl, got {opts.families}")
    return opts


class CudaPeak:
    """Wall time and torch.cuda.max_memory_allocated of a phase (None on the CPU)."""

    def __enter__(self) -> "CudaPeak":
        import torch
        self.peak = None
        if bc.cuda_active():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import torch
        bc.sync()
        self.seconds = time.perf_counter() - self.t0
        if bc.cuda_active():
            self.peak = torch.cuda.max_memory_allocated()


def free_memory() -> None:
    import gc
    import comfy.model_management as mm
    gc.collect()
    mm.soft_empty_cache()


def train_perres(model, clip, vae, images, opts, checkpointing: bool, resolution: int | None = None) -> dict:
    free_memory()
    with CudaPeak() as phase:
        _, residuals, loss = bc.run_node(
            "PerResTrainResiduals", model=model, clip=clip, vae=vae, images=images, identifier="sks",
            class_word="dog", steps=opts.train_steps, batch_size=opts.batch, learning_rate=1e-3, rank_ratio=0.05,
            resolution=resolution or opts.resolution, seed=0, init="random", gradient_checkpointing=checkpointing)
    return {"seconds": phase.seconds, "peak_allocated": phase.peak, "final_loss": loss["loss"][-1],
            "residuals": residuals}


def train_stock(model, vae, clip, images, opts) -> dict:
    latents = bc.run_node("VAEEncode", pixels=images, vae=vae)[0]
    positive = bc.run_node("CLIPTextEncode", clip=clip, text=CAPTION)[0]
    values = bc.stock_trainer_inputs({"model": model, "latents": latents, "positive": positive,
                                      "steps": opts.train_steps, "batch_size": opts.batch, "seed": 0})
    free_memory()
    with CudaPeak() as phase:
        bc.run_stock_trainer(values)
    settings = {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))}
    return {"seconds": phase.seconds, "peak_allocated": phase.peak, "settings": settings}


def sample_all(model, clip, residuals, opts, family: str, size: int, steps: int, sampler: str,
               scheduler: str) -> dict:
    """Seconds per sampling run of the base model, PerRes Apply, PerRes LAG, and a rank-32 LoRA merged by
    LoraLoaderModelOnly and through PerRes LAG LoRA; the same seed, latent and CFG for all."""
    applied = bc.run_node("PerResApplyResiduals", model=model, residuals=residuals, strength=1.0)[0]
    lag_model, lag_positive = bc.run_node("PerResLAGSampling", model=model, clip=clip, residuals=residuals,
                                          prompt=PROMPT, concept_words="sks dog", strength=1.0,
                                          threshold="median", quantile=0.5, start_percent=0.0, end_percent=1.0,
                                          outside_window="full residual")[:2]
    positive = bc.run_node("CLIPTextEncode", clip=clip, text=PROMPT)[0]
    negative = bc.run_node("CLIPTextEncode", clip=clip, text="")[0]
    latent = bc.run_node("EmptyLatentImage", width=size, height=size, batch_size=1)[0]
    lora = attention_ff_lora(model, family_of(family))
    configs = {"base": (model, positive), "apply": (applied, positive), "lag": (lag_model, lag_positive),
               "lora_merged": (merged_lora_model(model, lora), positive),
               "lora_lag": lag_lora_model(model, clip, lora)}
    times = {name: [] for name in configs}
    for repeat in range(opts.sample_repeats + 1):  # repeat 0 loads and warms up, untimed
        for name, (patcher, pos) in configs.items():
            with CudaPeak() as phase:
                bc.run_node("KSampler", model=patcher, seed=0, steps=steps, cfg=6.0, sampler_name=sampler,
                            scheduler=scheduler, positive=pos, negative=negative, latent_image=latent, denoise=1.0)
            if repeat:
                times[name].append(phase.seconds)
    return {name: {"seconds": bc.median(values), "runs": values} for name, values in times.items()}


def sampling_targets(sampling: dict, lag_lora_target: float) -> dict:
    return {
        "lag_over_apply": {"value": sampling["lag"]["seconds"] / sampling["apply"]["seconds"], "target": 1.05},
        "lag_lora_over_merged_lora": {"value": sampling["lora_lag"]["seconds"] / sampling["lora_merged"]["seconds"],
                                      "target": lag_lora_target},
    }


def sdxl_check(opts) -> dict:
    """PerRes on SDXL: training with and without checkpointing, TrainLoraNode, and sampling base vs Apply."""
    model, clip, vae = bc.load_model("sdxl", opts.device, threads=0, precision="fp16")
    size = opts.sdxl_resolution
    images = make_images(opts.batch, size)
    result = {"resolution": size, "unet_dtype": str(model.model.get_dtype())}
    result["perres_plain"] = train_perres(model, clip, vae, images, opts, checkpointing=False, resolution=size)
    result["perres_ckpt"] = train_perres(model, clip, vae, images, opts, checkpointing=True, resolution=size)
    residuals = result["perres_ckpt"].pop("residuals")
    result["perres_plain"].pop("residuals")
    if not opts.skip_stock:
        result["stock_lora"] = train_stock(model, vae, clip, images, opts)
    result["sampling"] = sample_all(model, clip, residuals, opts, "sdxl", size, opts.sdxl_sample_steps, "dpmpp_2m",
                                    "karras")
    peak = result["perres_ckpt"]["peak_allocated"]
    result["targets"] = {"sdxl_perres_ckpt_peak_gib": {"value": None if peak is None else peak / GIB, "target": 10.0},
                         **sampling_targets(result["sampling"], 1.10)}
    return result


def main() -> None:
    opts = parse_args()
    if "sd15" not in opts.families:
        sdxl_only(opts)
        return
    model, clip, vae = bc.load_sd15(opts.device, threads=0, precision="fp16")
    import torch
    import comfy.model_management as mm
    device_name = torch.cuda.get_device_name() if opts.device == "cuda" else platform.processor() or "cpu"
    images = make_images(opts.batch, opts.resolution)
    bc.say(f"device {device_name}; UNet weights {model.model.get_dtype()}, compute "
           f"{model.model.manual_cast_dtype or model.model.get_dtype()}; {opts.resolution} px, batch {opts.batch}, "
           f"{opts.train_steps} training steps, {opts.sample_steps} DDIM steps")

    results: dict = {"device": device_name, "comfyui": bc.comfy_version(mm.__file__.rsplit("/comfy/", 1)[0]),
                     "torch": torch.__version__, "settings": {k: v for k, v in vars(opts).items() if k != "json"}}
    plain = train_perres(model, clip, vae, images, opts, checkpointing=False)
    ckpt = train_perres(model, clip, vae, images, opts, checkpointing=True)
    residuals = ckpt.pop("residuals")
    plain.pop("residuals")
    results["perres_plain"], results["perres_ckpt"] = plain, ckpt
    if not opts.skip_stock:
        results["stock_lora"] = train_stock(model, vae, clip, images, opts)
    results["sampling"] = sample_all(model, clip, residuals, opts, "sd15", opts.resolution, opts.sample_steps, "ddim",
                                     "ddim_uniform")

    sampling = results["sampling"]
    results["targets"] = {
        "perres_plain_150_steps_s": {"value": plain["seconds"] * 150 / opts.train_steps, "target": 30.0},
        "perres_ckpt_peak_gib": {"value": None if ckpt["peak_allocated"] is None else ckpt["peak_allocated"] / GIB,
                                 "target": 6.0},
        **sampling_targets(sampling, 1.25),
    }

    bc.say("")
    bc.say("=" * 78)
    bc.say(f"GPU CHECK  {device_name}  ComfyUI {results['comfyui']}  torch {torch.__version__}")
    bc.say(f"  {'phase':34s} {'wall':>11s}  {'peak alloc':>10s}")
    bc.say(phase_row("PerRes train, no checkpointing", plain))
    bc.say(phase_row("PerRes train, checkpointing", ckpt))
    if "stock_lora" in results:
        bc.say(phase_row("ComfyUI TrainLoraNode (its defaults)", results["stock_lora"]))
    for name in ("base", "apply", "lag", "lora_merged", "lora_lag"):
        bc.say(phase_row(f"DDIM {opts.sample_steps} steps, {name}", sampling[name]))
    report_targets(results["targets"])
    if "sdxl" in opts.families:
        del model, clip, vae, residuals, plain, ckpt
        free_memory()
        results["sdxl"] = sdxl_check(opts)
        report_sdxl(results["sdxl"], opts)
    bc.say("=" * 78)
    with open(opts.json, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2, default=str)
    bc.say(f"wrote {opts.json}")


def phase_row(name: str, entry: dict) -> str:
    peak = "n/a" if entry.get("peak_allocated") is None else f"{entry['peak_allocated'] / GIB:.2f} GiB"
    return f"  {name:34s} {entry['seconds']:9.2f} s  {peak:>10s}"


def report_sdxl(sdxl: dict, opts) -> None:
    bc.say(f"  SDXL at {sdxl['resolution']} px, batch {opts.batch}, UNet {sdxl['unet_dtype']}:")
    bc.say(phase_row("PerRes SDXL train, no checkpointing", sdxl["perres_plain"]))
    bc.say(phase_row("PerRes SDXL train, checkpointing", sdxl["perres_ckpt"]))
    if "stock_lora" in sdxl:
        bc.say(phase_row("TrainLoraNode on SDXL (its defaults)", sdxl["stock_lora"]))
    for name in ("base", "apply", "lag", "lora_merged", "lora_lag"):
        bc.say(phase_row(f"dpmpp_2m {opts.sdxl_sample_steps} steps, {name}", sdxl["sampling"][name]))
    report_targets(sdxl["targets"])


def report_targets(targets: dict) -> None:
    for name, entry in targets.items():
        if entry["value"] is None:
            bc.say(f"  {name:34s}       n/a    (target <= {entry['target']}: not measured on this device)")
            continue
        verdict = "OK" if entry["value"] <= entry["target"] else "OVER TARGET"
        bc.say(f"  {name:34s} {entry['value']:9.3f}    (target <= {entry['target']}: {verdict})")


def sdxl_only(opts) -> None:
    import torch
    device_name = torch.cuda.get_device_name() if opts.device == "cuda" else platform.processor() or "cpu"
    sdxl = sdxl_check(opts)
    bc.say("=" * 78)
    bc.say(f"GPU CHECK (SDXL)  {device_name}  torch {torch.__version__}")
    report_sdxl(sdxl, opts)
    bc.say("=" * 78)
    with open(opts.json, "w", encoding="utf-8") as handle:
        json.dump({"device": device_name, "torch": torch.__version__, "sdxl": sdxl,
                   "settings": {k: v for k, v in vars(opts).items() if k != "json"}}, handle, indent=2, default=str)
    bc.say(f"wrote {opts.json}")


if __name__ == "__main__":
    main()
