"""The paper-scale GPU check, one command, one table, one JSON file: per family of --families, PerRes training
with and without gradient checkpointing, TrainLoraNode, and sampling with the base model, Apply, LAG and a LoRA
merged and through LAG LoRA, against the targets of benchmarks/README.md, "gpu_check.py".

    python custom_nodes/PerRes/benchmarks/gpu_check.py --families sd15,sdxl --json gpu_check.json
    python benchmarks/gpu_check.py --device cpu --smoke          # the same code paths, tiny, on a CPU
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
import harness as h  # noqa: E402
from bench_common import make_images  # noqa: E402
from bench_lag_lora import attention_ff_lora, family_of, lag_lora_model, merged_lora_model  # noqa: E402

CAPTION = "a photo of a sks dog"
PROMPT = "a photo of a sks dog on the beach"
GIB = h.GIB
PAPER_STEPS = 150


@dataclasses.dataclass(frozen=True)
class FamilyPlan:
    """What the check measures for one family, and the targets it holds the figures to."""
    family: str
    resolution: int
    train_steps: int
    sample_steps: int
    sample_repeats: int
    sampler: str
    scheduler: str
    peak_target_gib: float
    lag_lora_target: float
    plain_150_target_s: Optional[float]  # the paper-scale speed target (SD1.5 on an H100 only)
    cfg: float = 6.0
    latent: str = "EmptyLatentImage"     # the family's empty latent (16 channels for the DiTs)
    lag: bool = True                     # LAG and LAG LoRA run on it
    precision: str = "fp16"              # the UNets in fp16 as users' GPUs run them; the DiTs in bf16 (Krea 2: fp8)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = h.arguments(__doc__, device="cuda", json_default="gpu_check.json", threads=False, batch=4)
    p.add_argument("--families", default="sd15",
                   help="comma-separated: sd15, sdxl (default sd15), or anima, krea2: the DiTs run in a pass of "
                        "their own (bf16; the host starts once per process with one precision)")
    # per family: side in px, training steps (fewer on a lent machine: the 150-step time is extrapolated),
    # sampling steps and timed sampling runs; --sample-repeats is the others' default
    for prefix, who, resolution, sample_steps in (("", "SD1.5", 512, 50), ("sdxl-", "SDXL", 1024, 30),
                                                  ("dit-", "Anima and Krea 2", 1024, 30)):
        p.add_argument(f"--{prefix}resolution", type=int, default=resolution, help=f"{who} side in px")
        p.add_argument(f"--{prefix}train-steps", type=int, default=PAPER_STEPS, help=f"{who} training steps")
        p.add_argument(f"--{prefix}sample-steps", type=int, default=sample_steps, help=f"{who} sampling steps")
        p.add_argument(f"--{prefix}sample-repeats", type=int, default=None if prefix else 2,
                       help=f"{who} timed sampling runs")
    p.add_argument("--krea2-blocks", type=int, default=None,
                   help="blocks of the random Krea 2 (default: all 28 on cuda; the tests' 2 on a CPU)")
    p.add_argument("--skip-stock", action="store_true", help="leave out ComfyUI's TrainLoraNode")
    p.add_argument("--skip-stock-families", default="",
                   help="comma-separated families to run without TrainLoraNode (the CPU rehearsal: sdxl)")
    p.add_argument("--dynamic-vram", default="on", choices=["on", "off"],
                   help="ComfyUI's dynamic VRAM (comfy-aimdo) on NVIDIA, as 0.33.0's main.py enables it (default on)")
    p.add_argument("--deadline", type=float, default=0.0, metavar="SECONDS",
                   help="skip phases that would start more than SECONDS after launch (0: no deadline)")
    p.add_argument("--smoke", action="store_true",
                   help="64 px, 2 training and 2 sampling steps: checks every code path in minutes on a CPU")
    opts = p.parse_args(argv)
    for prefix in ("", "sdxl_", "dit_"):
        if opts.smoke:
            setattr(opts, f"{prefix}resolution", 64)
            setattr(opts, f"{prefix}train_steps", 2)
            setattr(opts, f"{prefix}sample_steps", 2)
            opts.sample_repeats = 1
        if getattr(opts, f"{prefix}sample_repeats") is None:
            setattr(opts, f"{prefix}sample_repeats", opts.sample_repeats)
    if opts.krea2_blocks is None:
        opts.krea2_blocks = 28 if opts.device == "cuda" else 2
    opts.families = h.choices(p, "--families", opts.families, {"sd15", "sdxl", *bc.DIT_FAMILIES})
    opts.skip_stock_families = [name.strip() for name in opts.skip_stock_families.split(",") if name.strip()]
    if {"sd15", "sdxl"} & set(opts.families) and set(bc.DIT_FAMILIES) & set(opts.families):
        p.error("run the DiTs (anima, krea2) in a pass of their own: the host starts once per process, with one "
                "precision (fp16 for the UNets, bf16 for the DiTs)")
    return opts


def plans(opts: argparse.Namespace) -> list[FamilyPlan]:
    every = {
        "sd15": FamilyPlan("sd15", opts.resolution, opts.train_steps, opts.sample_steps, opts.sample_repeats,
                           "ddim", "ddim_uniform", peak_target_gib=6.0, lag_lora_target=1.25,
                           plain_150_target_s=30.0),
        "sdxl": FamilyPlan("sdxl", opts.sdxl_resolution, opts.sdxl_train_steps, opts.sdxl_sample_steps,
                           opts.sdxl_sample_repeats, "dpmpp_2m", "karras", peak_target_gib=10.0,
                           lag_lora_target=1.10, plain_150_target_s=None),
        # Targets: Anima trains with the defaults on a 16 GB card, Krea 2 with fp8 weights on a 24 GB card.
        # LAG LoRA on the DiTs (issue 30): 30 steps at cfg 4 (cond and uncond batched), within 1.10× the merged LoRA
        "anima": FamilyPlan("anima", opts.dit_resolution, opts.dit_train_steps, opts.dit_sample_steps,
                            opts.dit_sample_repeats, "er_sde", "simple", peak_target_gib=14.0, lag_lora_target=1.10,
                            plain_150_target_s=None, cfg=4.0, latent="EmptySD3LatentImage", precision="bf16"),
        "krea2": FamilyPlan("krea2", opts.dit_resolution, opts.dit_train_steps, opts.dit_sample_steps,
                            opts.dit_sample_repeats, "euler", "simple", peak_target_gib=22.0, lag_lora_target=1.10,
                            plain_150_target_s=None, cfg=4.0, latent="EmptySD3LatentImage", precision="bf16"),
    }
    return [every[name] for name in opts.families]


def free_memory(unload: bool = False) -> None:
    import gc
    import comfy.model_management as mm
    if unload:
        mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()


class Report:
    """The figures so far, rewritten to --json after every phase (a run cut short keeps what it measured)."""

    def __init__(self, path: str, header: dict, deadline: float) -> None:
        self.path, self.data = path, header
        self.deadline = time.monotonic() + deadline if deadline > 0 else None

    def save(self) -> None:
        h.write_json(self.path, self.data)

    def phase(self, section: dict, name: str, measure: Callable[[], dict]) -> Optional[dict]:
        """Run one measurement into section[name]: its figures, {"error": ...} or {"skipped": ...}."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            section[name] = {"skipped": "the --deadline had passed"}
            h.say(f"[gpu_check] {name}: skipped, past the deadline")
        else:
            h.say(f"[gpu_check] {name} ...")
            try:
                section[name] = measure()
            except Exception as error:  # one broken phase must not cost the figures of the others
                logging.exception("gpu_check phase %s failed", name)
                section[name] = {"error": f"{type(error).__name__}: {error}"}
        self.save()
        entry = section[name]
        return None if "error" in entry or "skipped" in entry else entry


def train_perres(model, clip, vae, images, plan: FamilyPlan, batch: int, checkpointing: bool,
                 held: Optional[dict] = None) -> dict:
    """One PerRes Train Residuals call; the trained residuals go to held["residuals"] (not into the JSON)."""
    free_memory()
    with h.Measure(memory=False) as phase:
        _, residuals, loss, _ = bc.train_perres(model, clip, vae, images, plan.train_steps, batch, plan.resolution,
                                                gradient_checkpointing=checkpointing)
    if held is not None:
        held["residuals"] = residuals
    return {"seconds": phase.seconds, "steps": plan.train_steps, "peak_allocated": phase.cuda_peak,
            "gradient_checkpointing": checkpointing, "final_loss": loss["loss"][-1]}


def train_stock(model, vae, clip, images, plan: FamilyPlan, batch: int) -> dict:
    latents = {"samples": bc.image_latents(model, vae, images)}
    values = bc.stock_trainer_inputs({"model": model, "latents": latents, "positive": bc.encode(clip, CAPTION),
                                      "steps": plan.train_steps, "batch_size": batch, "seed": 0})
    free_memory()
    with h.Measure(memory=False) as phase:
        bc.run_stock_trainer(values)
    settings = {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))}
    return {"seconds": phase.seconds, "steps": plan.train_steps, "peak_allocated": phase.cuda_peak,
            "settings": settings}


def sample_all(model, clip, residuals, plan: FamilyPlan) -> dict:
    """Seconds per sampling run of the base model, PerRes Apply, and on UNets PerRes LAG and a rank-32 LoRA merged
    by LoraLoaderModelOnly and through PerRes LAG LoRA; the same seed, latent and CFG for all."""
    applied = bc.run_node("PerResApplyResiduals", model=model, residuals=residuals, strength=1.0)[0]
    positive, negative = bc.encode(clip, PROMPT), bc.encode(clip, "")
    latent = bc.run_node(plan.latent, width=plan.resolution, height=plan.resolution, batch_size=1)[0]
    configs = {"base": (model, positive), "apply": (applied, positive)}
    if plan.lag:
        lora = attention_ff_lora(model, family_of(plan.family))[0]
        configs.update({"lag": bc.lag_sampling(model, clip, PROMPT, "sks dog", residuals=residuals),
                        "lora_merged": (merged_lora_model(model, lora), positive),
                        "lora_lag": lag_lora_model(model, clip, lora)})
    runs = h.interleaved({name: (lambda c=config: bc.ksample(*c, negative, latent, plan.sample_steps, plan.cfg, 0,
                                                             plan.sampler, plan.scheduler))
                          for name, config in configs.items()},
                         plan.sample_repeats, label=plan.family)  # untimed first runs load and warm up
    return {name: {"seconds": h.median(series.totals), "runs": series.totals} for name, series in runs.items()}


def check_family(plan: FamilyPlan, opts: argparse.Namespace, report: Report) -> None:
    """Every phase of one family into report.data["families"][plan.family], then its targets."""
    section: dict = {"plan": dataclasses.asdict(plan), "batch": opts.batch}
    report.data["families"][plan.family] = section
    held: dict = {}  # the loaded (model, clip, vae), kept out of the JSON
    if report.phase(section, "load", lambda: load(plan, opts, held)) is None:
        return
    model, clip, vae = held.pop("objects")
    images = make_images(opts.batch, plan.resolution)
    # Two untimed steps first, so that moving the weights to the device and the first kernels' start-up
    # are not charged to whichever training phase happens to run first.
    warmup = dataclasses.replace(plan, train_steps=2)
    report.phase(section, "warmup", lambda: train_perres(model, clip, vae, images, warmup, opts.batch, False))
    report.phase(section, "perres_plain",
                 lambda: train_perres(model, clip, vae, images, plan, opts.batch, False, held))
    report.phase(section, "perres_ckpt",  # the default's residuals, when it succeeds, are the ones sampled
                 lambda: train_perres(model, clip, vae, images, plan, opts.batch, True, held))
    residuals = held.pop("residuals", None)
    if residuals is None:
        section["sampling"] = {"skipped": "no PerRes training phase succeeded"}
    else:
        report.phase(section, "sampling", lambda: sample_all(model, clip, residuals, plan))
    residuals = None  # (not `del`: the lambdas above close over these names; None releases them the same way)
    # The stock trainer last: it needs the most memory, and a host process it takes down (the CPU's OOM
    # killer, which no except clause sees) then costs none of PerRes's figures.
    if opts.skip_stock or plan.family in opts.skip_stock_families:
        section["stock_lora"] = {"skipped": "--skip-stock" if opts.skip_stock else "--skip-stock-families"}
    else:
        free_memory()
        report.phase(section, "stock_lora", lambda: train_stock(model, vae, clip, images, plan, opts.batch))
    section["targets"] = targets(plan, section)
    report.save()
    model = clip = vae = None
    free_memory(unload=True)  # the next family starts with the device and RAM this one used


def load(plan: FamilyPlan, opts: argparse.Namespace, held: dict) -> dict:
    """Start the host (first family only), build or reuse the cached checkpoint, and load it."""
    with h.Measure(memory=False) as phase:
        held["objects"] = bc.load_model(plan.family, opts.device, threads=0, precision=plan.precision,
                                        dynamic_vram=opts.dynamic_vram, krea2_blocks=opts.krea2_blocks)
    model = held["objects"][0]
    return {"seconds": phase.seconds, "unet_dtype": str(model.model.get_dtype()),
            "compute_dtype": str(model.model.manual_cast_dtype or model.model.get_dtype()),
            "patcher": type(model).__name__}


def per_150_steps(entry: Optional[dict]) -> Optional[float]:
    if not entry or "seconds" not in entry:
        return None
    return entry["seconds"] * PAPER_STEPS / entry["steps"]


def targets(plan: FamilyPlan, section: dict) -> dict:
    def figure(name: str, key: str) -> Optional[dict]:
        entry = section.get(name) or {}
        return entry.get(key) if isinstance(entry, dict) else None

    peak = figure("perres_ckpt", "peak_allocated")
    sampling = section.get("sampling") or {}

    def ratio(a: str, b: str) -> Optional[float]:
        if a in sampling and b in sampling:
            return sampling[a]["seconds"] / sampling[b]["seconds"]
        return None

    found = {"perres_ckpt_peak_gib": {"value": None if peak is None else peak / GIB, "target": plan.peak_target_gib}}
    if plan.lag:
        found["lag_over_apply"] = {"value": ratio("lag", "apply"), "target": 1.05}
        found["lag_lora_over_merged_lora"] = {"value": ratio("lora_lag", "lora_merged"), "target": plan.lag_lora_target}
    if plan.plain_150_target_s is not None:
        found["perres_plain_150_steps_s"] = {"value": per_150_steps(section.get("perres_plain")),
                                             "target": plan.plain_150_target_s}
    return found


def phase_row(name: str, entry: Optional[dict]) -> str:
    if not isinstance(entry, dict) or "seconds" not in entry:
        why = (entry or {}).get("error") or (entry or {}).get("skipped") or "not run"
        return f"  {name:40s} {'—':>11s}  {why}"
    peak = "n/a" if entry.get("peak_allocated") is None else f"{entry['peak_allocated'] / GIB:.2f} GiB"
    extra = ""
    if "steps" in entry and entry["steps"] != PAPER_STEPS:
        extra = f"  ({entry['steps']} steps; {per_150_steps(entry):.1f} s per {PAPER_STEPS})"
    return f"  {name:40s} {entry['seconds']:9.2f} s  {peak:>10s}{extra}"


def report_family(plan: FamilyPlan, section: dict, batch: int) -> None:
    loaded = section.get("load") or {}
    h.say(f"  {plan.family.upper()} at {plan.resolution} px, batch {batch}, {plan.train_steps} training steps, "
           f"UNet {loaded.get('unet_dtype', '?')} (compute {loaded.get('compute_dtype', '?')}), "
           f"patcher {loaded.get('patcher', '?')}")
    h.say(phase_row("load checkpoint", section.get("load")))
    h.say(phase_row("PerRes train, checkpointing off", section.get("perres_plain")))
    h.say(phase_row("PerRes train, checkpointing on", section.get("perres_ckpt")))
    sampling = section.get("sampling") or {}
    label = f"{plan.sampler} {plan.sample_steps} steps"
    if "base" not in sampling:
        h.say(phase_row(f"{label}, sampling", sampling))
    for name in ("base", "apply", "lag", "lora_merged", "lora_lag"):
        if name in sampling:
            h.say(phase_row(f"{label}, {name}", sampling[name]))
    h.say(phase_row("ComfyUI TrainLoraNode (its defaults)", section.get("stock_lora")))
    for name, entry in section.get("targets", {}).items():
        value, target = entry["value"], entry["target"]
        h.say(f"  {name:40s}       n/a    (target <= {target}: not measured here)" if value is None else
              f"  {name:40s} {value:9.3f}    (target <= {target}: {h.verdict(value, target)})")


def main(argv: Optional[list[str]] = None) -> dict:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = {k: v for k, v in vars(opts).items() if k != "json"}
    h.say(f"[gpu_check] settings: {json.dumps(settings)}")
    report = Report(opts.json, {"settings": settings, "families": {}}, opts.deadline)
    family_plans = plans(opts)
    for plan in family_plans:
        check_family(plan, opts, report)
    found = h.host_info(opts.device)
    header = {**{key: found[key] for key in ("device", "comfyui", "torch", "dynamic_vram")}, "date": h.today()}
    report.data = {**header, **report.data}
    report.save()
    h.say("")
    h.say("=" * 100)
    h.say(f"GPU CHECK  {header['device']}  ComfyUI {header['comfyui']}  torch {header['torch']}  "
           f"dynamic VRAM {header['dynamic_vram']}")
    for plan in family_plans:
        report_family(plan, report.data["families"][plan.family], opts.batch)
    h.say("=" * 100)
    h.say(f"wrote {opts.json}")
    return report.data


if __name__ == "__main__":
    main()
