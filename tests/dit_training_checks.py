"""PerRes on one diffusion-transformer family, measured in a process of its own (test_host_dit_models.py runs it
and asserts on what it prints; a DiT's gigabytes never sit beside the suite's other models).

`python dit_training_checks.py FAMILY HOST_ROOT WORKDIR` loads the random model of FAMILY (tests/dit_models.py)
through the stock loaders as users do (Anima in bf16 as released, Krea 2 with weight_dtype fp8_e4m3fn), runs
PerRes Train Residuals and the other nodes on it at 64 px and prints one line `RESULT {json}`: the SDXL
invariants (checkpointing on/off, the held-out loss, same seed same bytes, masks of ones, stock loader ≡ Apply,
refusals, continuing, buckets, previews, snapshots) as numbers and messages, nothing judged here.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import resource
import sys
import time

import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SETTINGS = dict(identifier="sks", class_word="dog", steps=2, batch_size=2, learning_rate=1e-2, rank_ratio=0.05,
                resolution=64, seed=5, init="random", gradient_checkpointing=True, preview_every=0)
# how each family is loaded: the released dtype (Anima, bf16) or how users fit it (Krea 2, fp8 weights)
WEIGHT_DTYPE = {"Anima": "default", "Krea2": "fp8_e4m3fn"}


def concept_images() -> torch.Tensor:
    """Four 64 px synthetic 'concept' images: a bright square on a varying background (as conftest's)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(4, 64, 64, 3, generator=generator) * 0.3
    images[:, 16:48, 16:48, 0] = 0.9
    return images


def cache_encodings(clip) -> None:
    """Encode each caption once per process: Krea 2's fp8 Qwen3-VL-4B takes about 30 s a prompt on this CPU,
    and every training run encodes its caption again. The encoder's output for a token list never changes."""
    encode, cache = clip.encode_from_tokens_scheduled, {}

    def cached(tokens, *args, **kwargs):
        key = repr(tokens)
        if key not in cache:
            cache[key] = encode(tokens, *args, **kwargs)
        return cache[key]
    clip.encode_from_tokens_scheduled = cached


def error_of(action) -> str | None:
    try:
        action()
    except Exception as exc:  # the message the user would see
        return f"{type(exc).__name__}: {exc}"
    return None


class Checks:
    def __init__(self, family: str, host_root: str, workdir: str, precise: bool = False) -> None:
        """precise: fp32 weights and compute (the CPU's default for Load Diffusion Model), where a weight merge
        and an activation delta agree to rounding; else as users run them (bf16 compute, Krea 2 in fp8)."""
        sys.path.insert(0, TESTS_DIR)
        import comfy_host

        comfy_host.start_host(host_root, workdir)
        from comfy.cli_args import LatentPreviewMethod, args

        args.bf16_unet = not precise  # the released dtype; fp32 on the CPU would double the memory
        args.preview_method = LatentPreviewMethod.Latent2RGB  # a server's default (in-process: none)
        from dit_models import DIT_TEST_MODELS, stock_loaded

        self.comfy_host = comfy_host
        self.run_node, self.node_ui, self.pack = comfy_host.run_node, comfy_host.node_ui, comfy_host.pack
        (self.spec,) = [m for m in DIT_TEST_MODELS if m.config_name == family]
        self.workdir = workdir
        weight_dtype = "default" if precise else WEIGHT_DTYPE[family]
        self.model, self.clip, self.vae = stock_loaded(self.spec, workdir, weight_dtype)
        if not precise:
            comfy_host.compute_in_bf16(self.model)  # as on a GPU; fp32 casts would keep +8 GB of weight copies
        cache_encodings(self.clip)
        self.images = concept_images()
        self.result: dict = {}

    def train(self, model=None, images=None, **overrides):
        """(model, residuals, loss_map, snapshots) of PerRes Train Residuals."""
        return self.run_node("PerResTrainResiduals", model=model or self.model, clip=self.clip, vae=self.vae,
                             images=self.images if images is None else images, **{**SETTINGS, **overrides})

    def save(self, residuals, prefix: str) -> str:
        return self.run_node("PerResSaveResiduals", residuals=residuals, filename_prefix=prefix)[0]

    def lora_path(self, name: str) -> str:
        return os.path.join(self.workdir, "models", "loras", name)

    def sampling(self) -> None:
        """What the host made of the files, and the stock text encoder, sampler and VAE on them (one euler step)."""
        positive = self.run_node("CLIPTextEncode", clip=self.clip, text="a photo of a sks dog")[0]
        negative = self.run_node("CLIPTextEncode", clip=self.clip, text="")[0]
        latent = self.run_node("EmptySD3LatentImage", width=64, height=64, batch_size=1)[0]
        sampled = self.run_node("KSampler", model=self.model, seed=0, steps=1, cfg=4.0, sampler_name="euler",
                                scheduler="simple", positive=positive, negative=negative, latent_image=latent,
                                denoise=1.0)[0]
        image = self.run_node("VAEDecode", samples=sampled, vae=self.vae)[0]
        sampled = sampled["samples"]
        sampling = self.model.get_model_object("model_sampling")
        denoiser = self.model.model.diffusion_model
        self.result.update(
            config=type(self.model.model.model_config).__name__,
            sampling=[c.__name__ for c in type(sampling).__mro__], shift=float(sampling.shift),
            model_parameters=sum(p.numel() for p in denoiser.parameters()),
            latent_finite=bool(torch.isfinite(sampled).all()), image=list(image.shape),
            image_finite=bool(torch.isfinite(image).all()))

    def describe(self) -> None:
        host, training = self.pack("nodes.host.model"), self.pack("nodes.host.training")
        family = host.family_of_model(self.model)
        residuals = self.pack("perres_core.residual").ResidualSet.for_family(family, 0.05,
                                                                            host.unet_config_of(self.model))
        conditioning = training.caption_conditioning(self.model, self.clip, "a photo of a sks dog", 64, 64)
        with torch.inference_mode():
            latents = training.encode_images(self.vae, self.images, self.model)  # one latent per image
        schedule = host.diffusion_schedule(self.model)
        self.result.update(
            family=family.name, layers=sorted(residuals.layers),
            ranks=sorted({layer.rank for layer in residuals.layers.values()}),
            parameters=residuals.parameter_count(), prediction=schedule.prediction, levels=schedule.num_timesteps,
            context=list(conditioning.context.shape), extras=sorted(conditioning.extras), latents=list(latents.shape),
            weight_dtype=str(next(self.model.model.diffusion_model.parameters()).dtype),
            compute_dtype=str(training.training_dtype(self.model.model)))

    def checkpointing_and_bytes(self) -> None:
        """Checkpointing on and off give the same residual; the same seed gives the same bytes; masks of ones are
        no masks."""
        residual_mod = self.pack("perres_core.residual")
        residual_mod.training_date = lambda: "2026-12-01"
        started = time.monotonic()
        plain = self.train(gradient_checkpointing=False)
        self.result["seconds_per_step"] = (time.monotonic() - started) / SETTINGS["steps"]
        checkpointed = self.train()
        again = self.train()
        ones = self.train(masks=torch.ones(4, 64, 64), background_weight=0.0)
        start = residual_mod.ResidualSet.for_family(self.pack("nodes.host.model").family_of_model(self.model), 0.05,
                                                    self.pack("nodes.host.model").unet_config_of(self.model))
        with torch.inference_mode(False):
            start.initialize("random", SETTINGS["seed"])
        self.result["checkpointing_factor_difference"] = max_difference(plain[1], checkpointed[1])
        self.result["checkpointing_losses"] = [plain[2]["loss"], checkpointed[2]["loss"]]
        self.result["training_changed"] = max_difference(start, checkpointed[1])
        self.result["masks_of_ones_difference"] = max_difference(checkpointed[1], ones[1])
        names = [self.save(run[1], "perres/dit_same") for run in (checkpointed, again)]
        a, b = (open(self.lora_path(name), "rb").read() for name in names)
        self.result["same_seed_same_bytes"] = names[0] != names[1] and a == b
        header = self.pack("perres_core.residual_file").read_header(self.lora_path(names[0]))
        metadata = header.pop("__metadata__")
        self.result["metadata"] = {key: metadata.get(key) for key in (
            "modelspec.architecture", "modelspec.implementation", "ss_base_model_version", "perres.base_model")}
        self.result["file_layers"] = sorted({key.rsplit(".lora_", 1)[0].removesuffix(".alpha") for key in header})
        self.checkpointed = checkpointed[1]

    def held_out_loss(self, residuals) -> float:
        """The flow loss of the model with `residuals` on the images at fixed noise levels (¼, ½, ¾ of the
        schedule) and noise training never draws."""
        training, hooks, host = (self.pack("perres_core.training"), self.pack("nodes.host.residual_hooks"),
                                 self.pack("nodes.host.training"))
        with torch.inference_mode():
            latents = host.model_latents(self.model.model, host.encode_images(self.vae, self.images,
                                                                               self.model)).clone()
        conditioning = host.caption_conditioning(self.model, self.clip, "a photo of a sks dog", 64, 64)
        schedule = self.pack("nodes.host.model").diffusion_schedule(self.model)
        levels = torch.tensor([share * schedule.num_timesteps // 4 for share in (1, 2, 3)])
        import comfy.model_management
        comfy.model_management.load_models_gpu([self.model], force_full_load=True)
        with torch.no_grad(), hooks.residual_hooks(self.model.model.diffusion_model, residuals.layers):
            return training.evaluation_loss(host.denoiser_prediction(self.model.model), latents, conditioning,
                                            schedule, levels, seed=12345, dtype=host.training_dtype(self.model.model))

    def learning(self) -> None:
        untrained = self.pack("perres_core.residual").ResidualSet.for_family(
            self.pack("nodes.host.model").family_of_model(self.model), 0.05,
            self.pack("nodes.host.model").unet_config_of(self.model))
        with torch.inference_mode(False):
            untrained.initialize("random", 4)
        trained = self.train(steps=6, batch_size=4, seed=4, learning_rate=1e-3)  # the paper's
        self.result["held_out"] = [self.held_out_loss(untrained), self.held_out_loss(trained[1])]
        self.result["losses"] = trained[2]["loss"]
        self.trained = trained[1]

    def stock_loader_parity(self) -> None:
        name = self.save(self.trained, "perres/dit_parity")
        records = []
        handler = logging.Handler()
        handler.emit = lambda record: records.append(record.getMessage())
        logging.getLogger().addHandler(handler)
        try:
            (stock,) = self.run_node("LoraLoaderModelOnly", model=self.model, lora_name=name, strength_model=1.0)
        finally:
            logging.getLogger().removeHandler(handler)
        (ours,) = self.run_node("PerResApplyResiduals", model=self.model, residuals=self.trained, strength=1.0)
        self.result["keys_not_loaded"] = [r for r in records if "lora key not loaded" in r]
        self.result["stock_patches"] = sorted(k for k in stock.patches if k.endswith(".weight"))
        self.result["apply_patches"] = sorted(k for k in ours.patches if k.endswith(".weight"))
        conditioning = self.pack("nodes.host.training").caption_conditioning(self.model, self.clip,
                                                                             "a photo of a sks dog", 64, 64)
        x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
        outputs = [denoised(m, x, 0.7, conditioning) for m in (self.model, stock, ours)]
        self.result["stock_vs_apply"] = float((outputs[1] - outputs[2]).abs().max())
        self.result["apply_vs_base"] = float((outputs[2] - outputs[0]).abs().max())
        self.result["load_node_text"] = self.node_ui("PerResLoadResiduals", residual_name=name)["text"][0]

    def continuing_snapshots_buckets_previews(self) -> None:
        import comfy.utils

        previews = []
        comfy.utils.PROGRESS_BAR_HOOK = lambda value, total, preview, node_id=None: previews.append(
            None if preview is None else list(preview[1].size))
        continued = self.train(steps=1, initial_residuals=self.checkpointed, snapshot_every=1, preview_every=1,
                               snapshot_prefix="perres/dit_snap")
        comfy.utils.PROGRESS_BAR_HOOK = None
        self.result["continued_steps"] = [continued[1].training.get("steps"),
                                          continued[1].training.get("continued_from_steps")]
        self.result["snapshots"] = len(continued[3])
        self.result["previews"] = previews
        wide = torch.rand(2, 64, 128, 3, generator=torch.Generator().manual_seed(2))  # 2:1, a bucket of its own
        bucketed = self.train(steps=1, images=[self.images[:2], wide], crop="buckets", resolution=128)
        self.result["buckets"] = bucketed[1].training.get("buckets")

    def suggester(self) -> None:
        """PerRes Suggest Class Word on the DiT: the same diffusion classifier, judged in ε (from the velocity)."""
        text = self.run_node("PerResSuggestClassWord", model=self.model, clip=self.clip, vae=self.vae,
                             images=self.images, candidates="dog, toy", budget=2, seed=0, resolution=64)
        self.result["suggested"] = [text[0], text[1]]

    def refusals(self) -> None:
        sd1 = self.pack("perres_core.residual").ResidualSet.for_family(self.pack("perres_core.families").SD1)
        host = self.pack("nodes.host.training")
        four_channels = torch.zeros(1, 4, 8, 8)  # what an SD or SDXL VAE gives for a 64 px image
        self.result["refusals"] = {
            "sd1_residual": error_of(lambda: self.run_node("PerResApplyResiduals", model=self.model, residuals=sd1,
                                                           strength=1.0)),
            "sd_vae_latent": error_of(lambda: host.image_latents(four_channels, self.model)),
        }

    def other_text_encoder(self, family: str) -> None:
        """The other DiT's text encoder on this model: refused by name before any training."""
        from dit_models import COMPANIONS

        other = "Krea2" if family == "Anima" else "Anima"
        text_encoder, clip_type, _ = COMPANIONS[other]
        text_encoder.link(self.workdir)
        self.release(model=False)  # the family's own text encoder goes before the other one comes
        (clip,) = self.run_node("CLIPLoader", clip_name=text_encoder.file_name, type=clip_type)
        self.result["refusals"]["other_text_encoder"] = error_of(lambda: self.run_node(
            "PerResTrainResiduals", model=self.model, clip=clip, vae=self.vae, images=self.images,
            **{**SETTINGS, "steps": 1}))
        clip = None  # the other family's 1–4 GB go, and this model with them
        self.release()

    def fp8_copy(self) -> None:
        """Anima with fp8_e4m3fn weights (Krea 2 is loaded so already): trains, and the bf16 model's residual
        applies to it (another checkpoint of the family) and samples."""
        from dit_models import stock_loaded

        self.release(clip=False)  # one copy of the DiT at a time: the bf16 one goes before the fp8 one comes
        model = self.model = stock_loaded(self.spec, self.workdir, "fp8_e4m3fn")[0]
        self.comfy_host.compute_in_bf16(model)
        trained = self.train(model=model, steps=1)[1]
        self.result["fp8_weights"] = str(next(model.model.diffusion_model.parameters()).dtype)
        self.result["fp8_factors_finite"] = all(bool(torch.isfinite(p).all()) and p.dtype == torch.float32
                                                for p in trained.parameters())
        self.result["fp8_changed"] = max_difference(trained, self.checkpointed) > 0
        (patched,) = self.run_node("PerResApplyResiduals", model=model, residuals=self.trained, strength=1.0)
        positive = self.run_node("CLIPTextEncode", clip=self.clip, text="a photo of a sks dog")[0]
        latent = self.run_node("EmptySD3LatentImage", width=64, height=64, batch_size=1)[0]
        sampled = self.run_node("KSampler", model=patched, seed=0, steps=1, cfg=1.0, sampler_name="euler",
                                scheduler="simple", positive=positive, negative=positive, latent_image=latent,
                                denoise=1.0)[0]["samples"]
        self.result["other_checkpoint_sample_finite"] = bool(torch.isfinite(sampled).all())

    def release(self, model: bool = True, clip: bool = True) -> None:
        """Drop the loaded DiT and/or its text encoder: ComfyUI unloads them and their memory goes back, so the
        next step's copy is the only one (the process stays well inside the suite's memory)."""
        import comfy.model_management

        if model:
            self.model = None
        if clip:
            self.clip = None
        comfy.model_management.unload_all_models()
        gc.collect()

    def example_workflow(self, family: str, kind: str = "train_and_sample", key: str = "workflow") -> None:
        """The family's example workflow of `kind` (API twin), made cheap, through ComfyUI's validation and
        executor; what happened goes to result[key] (and whether it validated to result[key + "_valid"])."""
        import asyncio
        import uuid

        import execution
        from dit_models import COMPANIONS
        from workflow_runs import DIT_WORKFLOWS, failure_report, for_tests

        (name,) = [n for n, f in DIT_WORKFLOWS.items() if f == family and n.endswith(kind)]
        with open(os.path.join(os.path.dirname(TESTS_DIR), "example_workflows", "api", name + ".json")) as handle:
            prompt = json.load(handle)
        text_encoder, _, vae = COMPANIONS[family]
        files = {"unet_name": self.spec.file_name, "clip_name": text_encoder.file_name, "vae_name": vae.file_name}
        prompt = for_tests(name, prompt, files, {})
        records = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: records.append(record.getMessage())
        logging.getLogger("perres").addHandler(handler)
        prompt_id = str(uuid.uuid4())
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        self.result[key + "_valid"] = [bool(valid), str(error)[:500], json.dumps(node_errors, default=str)[:1000]]
        executor = self.comfy_host.prompt_executor()
        try:
            executor.execute(prompt, prompt_id, {}, outputs)
        finally:
            logging.getLogger("perres").removeHandler(handler)
        results = executor.history_result.get("outputs", {}) if executor.success else {}
        self.result[key] = dict(
            name=name, success=bool(executor.success), failure=None if executor.success else failure_report(executor),
            outputs={node_id: prompt[node_id]["class_type"] for node_id in results},
            warnings=records)

def memory_gib() -> dict[str, float]:
    """This process's resident memory now and at its peak so far (VmRSS, VmHWM), in GiB (Linux; {} elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            fields = dict(line.split(":", 1) for line in handle if line.startswith(("VmRSS", "VmHWM")))
    except OSError:
        return {}
    return {name: round(int(value.split()[0]) / 2 ** 20, 2) for name, value in fields.items()}


def max_difference(a, b) -> float:
    return max(float((a.layers[k].up - b.layers[k].up).abs().max().item()) +
               float((a.layers[k].down - b.layers[k].down).abs().max().item()) for k in a.layers)


def denoised(model, x: torch.Tensor, sigma: float, conditioning) -> torch.Tensor:
    """The patched model's x̂0 through ComfyUI's apply_model, with the inputs extra_conds made."""
    import comfy.model_management

    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        frames = x.unsqueeze(2) if model.model.latent_format.latent_dimensions == 3 else x
        return model.model.apply_model(frames, torch.full((x.shape[0],), sigma), c_crossattn=conditioning.context,
                                       **conditioning.model_inputs()).float().cpu()


def main(family: str, host_root: str, workdir: str) -> None:
    checks = Checks(family, host_root, workdir)
    steps = [checks.sampling, checks.describe, checks.checkpointing_and_bytes, checks.learning,
             checks.stock_loader_parity, checks.continuing_snapshots_buckets_previews, checks.suggester,
             checks.refusals]
    if family == "Anima":
        steps.append(checks.fp8_copy)  # from here on the model is its fp8 copy
    # last, each with its own copies: the other family's text encoder (on this family's model, its own text
    # encoder gone) and the example workflow (the loaders load theirs)
    steps += [lambda: checks.other_text_encoder(family), checks.release, lambda: checks.example_workflow(family)]
    timings, memory = {}, {}
    for number, step in enumerate(steps):
        started = time.monotonic()
        step()
        name = f"{number}:{getattr(step, '__name__', 'step')}"
        timings[name] = round(time.monotonic() - started, 1)
        memory[name] = memory_gib()
    checks.result["timings"], checks.result["memory_gib"] = timings, memory
    checks.result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    sys.stdout.write("RESULT " + json.dumps(checks.result) + "\n")  # what the test reads
    sys.stdout.flush()


if __name__ == "__main__":
    main(*sys.argv[1:4])
