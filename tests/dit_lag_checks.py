"""LAG on one diffusion-transformer family, measured in a process of its own (test_host_dit_lag.py runs it and
asserts on what it prints).

`python dit_lag_checks.py FAMILY HOST_ROOT WORKDIR` loads the random model of FAMILY as dit_training_checks.py does
(Anima in bf16, Krea 2 with fp8 weights; both compute in bf16), writes LoRA files on the blocks' attention and MLP
layers in the formats the host's loader reads for it (kohya names, diffusers/PEFT names, LoHa, LoKr, DoRA), and
prints one line `RESULT {json}` of numbers and messages: how far LAG with masks of ones is from
LoraLoaderModelOnly at 1 and 4 steps, whether masks of zeros are the base model bit for bit, how far the concept
maps are from the maps of the q and k the host hands its attention function, two LoRAs' mask overlap, LAG on a
stock-LoRA model and under another attention override, a PerRes residual through PerRes LAG Sampling, the mask
preview, and the refusal of another family's LoRA. Nothing is judged here.
"""
from __future__ import annotations

import json
import os
import sys

import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS_DIR)
from dit_training_checks import Checks, error_of, memory_gib  # noqa: E402
from lora_files import DIT_BLOCK_LAYERS  # noqa: E402

PROMPT = "a photo of ohwx woman and a zkz dog on a beach"
LAG_DEFAULTS = dict(prompt=PROMPT, concept_words="", strength=1.0, threshold="median", quantile=0.5,
                    start_percent=0.0, end_percent=1.0, outside_window="full residual")
# layers that run before their block's concept map is made
BEFORE_LAYERS = {"Anima": ("self_attn.q_proj", "self_attn.v_proj", "self_attn.output_proj", "cross_attn.q_proj"),
                 "Krea2": ("attn.wq", "attn.wk", "attn.wv", "attn.gate")}
BLOCKS = {"Anima": (0, 13, 27), "Krea2": (0, 1)}
# ΔW's entries as a share of W's spread: a weight merge rounds W + ΔW to the stored dtype (bf16: 2⁻⁸ of |W|, fp8
# e4m3: 2⁻⁴), so the test LoRAs must change W by much more than that for the stock loader's merge to keep them
DELTA_SCALE = {"Anima": 0.1, "Krea2": 0.1}


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


class LagChecks(Checks):
    def __init__(self, family: str, host_root: str, workdir: str) -> None:
        # fp32: a weight merge in bf16 (fp8) rounds W + ΔW to 2⁻⁸ (2⁻⁴) of |W|, and these random models pass that
        # rounding noise on: LoraLoaderModelOnly at strength 0.8 and 0.808 then differ by half the LoRA's effect
        super().__init__(family, host_root, workdir, precise=True)
        self.family_name = family
        self.positive = self.run_node("CLIPTextEncode", clip=self.clip, text=PROMPT)[0]
        self.negative = self.run_node("CLIPTextEncode", clip=self.clip, text="")[0]
        self.names: dict[str, list[str]] = {}
        import comfy.lora

        for name, target in comfy.lora.model_lora_keys_unet(self.model.model, {}).items():
            self.names.setdefault(target, []).append(name)

    # --- LoRA files ------------------------------------------------------------------------------
    def key_of(self, path: str, fmt: str) -> str:
        """The name a `fmt` file gives the layer at `path`, from the host's key map."""
        names = self.names[f"diffusion_model.{path}.weight"]
        kohya = "lora_unet_" + path.replace(".", "_")
        if fmt in ("kohya", "loha", "lokr", "dora"):
            return kohya
        return sorted(n for n in names if not n.startswith("lora_unet_"))[0]   # diffusers / ai-toolkit names

    def write_lora(self, file_name: str, fmt: str, layers: list[str], seed: int, rank: int = 4) -> str:
        from safetensors.torch import save_file

        generator = torch.Generator().manual_seed(seed)
        denoiser = self.model.model.diffusion_model
        tensors = {}
        for path in layers:
            weight = denoiser.get_submodule(path).weight
            out_f, in_f = weight.shape
            size = DELTA_SCALE[self.family_name] * float(weight.detach().float().std())
            key = self.key_of(path, fmt)

            def randn(*shape: int) -> torch.Tensor:
                return torch.randn(shape, generator=generator)
            if fmt in ("kohya", "dora"):
                tensors.update({f"{key}.lora_down.weight": randn(rank, in_f) / rank ** 0.5,
                                f"{key}.lora_up.weight": randn(out_f, rank) * size,
                                f"{key}.alpha": torch.tensor(float(rank))})
                if fmt == "dora":
                    norm = weight.detach().float().norm(dim=1, keepdim=True)
                    tensors[f"{key}.dora_scale"] = norm * (1 + 0.1 * randn(out_f, 1))
            elif fmt == "peft":
                tensors.update({f"{key}.lora_A.weight": randn(rank, in_f) / rank ** 0.5,
                                f"{key}.lora_B.weight": randn(out_f, rank) * size})
            elif fmt == "loha":
                factor = (size / rank ** 0.5) ** 0.5
                tensors.update({f"{key}.hada_w1_a": randn(out_f, rank) * factor,
                                f"{key}.hada_w1_b": randn(rank, in_f) * factor,
                                f"{key}.hada_w2_a": randn(out_f, rank),
                                f"{key}.hada_w2_b": randn(rank, in_f) / rank ** 0.5,
                                f"{key}.alpha": torch.tensor(float(rank))})
            elif fmt == "lokr":   # kohya_ss's LoKr for Anima: a small Kronecker factor and a low-rank big one
                tensors.update({f"{key}.lokr_w1": randn(4, 4), f"{key}.lokr_w2_a": randn(out_f // 4, rank) * size,
                                f"{key}.lokr_w2_b": randn(rank, in_f // 4) / rank ** 0.5 / 4,
                                f"{key}.alpha": torch.tensor(float(rank))})
        os.makedirs(os.path.dirname(self.lora_path(file_name)), exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, self.lora_path(file_name))
        return file_name

    def block_layers(self, parts) -> list[str]:
        return [f"blocks.{n}.{part}" for n in BLOCKS[self.family_name] for part in parts]

    # --- sampling ----------------------------------------------------------------------------
    def sample(self, model, steps: int = 1, seed: int = 3, positive=None) -> torch.Tensor:
        latent = self.run_node("EmptySD3LatentImage", width=64, height=64, batch_size=1)[0]
        return self.run_node("KSampler", model=model, seed=seed, steps=steps, cfg=4.0, sampler_name="euler",
                             scheduler="simple", positive=positive or self.positive, negative=self.negative,
                             latent_image=latent, denoise=1.0)[0]["samples"].float()

    def lag(self, chain, model=None, constant=None, **settings):
        concepts = None
        for name, words, strength in chain:
            concepts = self.run_node("PerResLAGLoRA", lora_name=name, trigger_words=words, strength=strength,
                                     concepts=concepts)[0]
        if constant is None and not settings:
            return self.run_node("PerResLAGSampling", model=model or self.model, clip=self.clip,
                                 extra_concepts=concepts, **LAG_DEFAULTS)
        mask_settings = self.pack("perres_core.lag").MaskSettings(constant=constant, **settings)
        return self.pack("nodes.lag_nodes").build_lag_model(model or self.model, self.clip, PROMPT, concepts,
                                                            mask_settings)

    def stock(self, name: str, model=None, strength: float = 1.0):
        return self.run_node("LoraLoaderModelOnly", model=model or self.model, lora_name=name,
                             strength_model=strength)[0]

    def relative(self, result, reference, base) -> dict:
        """How far `result` is from `reference`, as a share of the reference's own change of `base` (largest
        element, and norm)."""
        effect = max_difference(reference, base)
        return {"error": max_difference(result, reference) / max(effect, 1e-12), "effect": effect,
                "norm_error": float((result - reference).norm() / (reference - base).norm().clamp_min(1e-12))}

    # --- the checks ----------------------------------------------------------------------------
    def ones_and_zeros(self) -> None:
        layers = self.block_layers(DIT_BLOCK_LAYERS[self.family_name])
        out = {}
        base = {steps: self.sample(self.model, steps) for steps in (1, 4)}
        for fmt in ("kohya", "peft", "loha", "lokr", "dora"):
            name = self.write_lora(f"dit_{fmt}.safetensors", fmt, layers if fmt in ("kohya", "peft") else
                                   self.block_layers(DIT_BLOCK_LAYERS[self.family_name][:2]), seed=len(out))
            for steps in ((1, 4) if fmt == "kohya" else (1,)):
                ones, positive = self.lag([(name, "ohwx, woman", 0.8)], constant=1.0)
                stock = self.sample(self.stock(name, strength=0.8), steps)
                out[f"{fmt}_{steps}"] = self.relative(self.sample(ones, steps, positive=positive), stock, base[steps])
            zeros, positive = self.lag([(name, "ohwx, woman", 0.8)], constant=0.0)
            out[f"{fmt}_zeros_identical"] = bool(torch.equal(self.sample(zeros, 1, positive=positive), base[1]))
        # masks of ones because the attention says so (quantile 0), for a LoRA on the layers before the map
        before = self.write_lora("dit_before.safetensors", "kohya", self.block_layers(BEFORE_LAYERS[self.family_name]),
                                 seed=11)
        for steps in (1, 4):
            ones, positive = self.lag([(before, "ohwx, woman", 1.0)], mode="quantile", quantile=0.0)
            out[f"before_{steps}"] = self.relative(self.sample(ones, steps, positive=positive),
                                                   self.sample(self.stock(before), steps), base[steps])
        self.result["ones"] = out
        self.lora = "dit_kohya.safetensors"

    def maps_are_the_attentions(self) -> None:
        """The concept maps LAG made against maps from the q and k the host's attention function received."""

        # a LoRA that leaves the keys alone: the maps are then the base attention's, which the host computes
        mlp = self.write_lora("dit_mlp.safetensors", "kohya",
                              self.block_layers(DIT_BLOCK_LAYERS[self.family_name][-1:]),
                              seed=41)
        patched, positive = self.lag([(mlp, "ohwx, woman", 1.0)])
        patch = self.pack("nodes.host.lag_patch").LagPatch.of(patched)
        captured = []
        family = patch.family

        def override(function, q, k, v, heads, *args, **kwargs):
            captured.append((q.detach().clone(), k.detach().clone(), kwargs.get("skip_reshape", False), heads,
                             dict(kwargs.get("transformer_options", {}))))
            return function(q, k, v, heads, *args, **kwargs)
        maps = []
        original = patch._keep_site_masks

        def logged(site, state, queries, by_concept):
            maps.append((site.site, {c: m.detach().clone() for c, m in by_concept.items()}))
            return original(site, state, queries, by_concept)
        patch._keep_site_masks = logged
        overridden = patched.clone()
        overridden.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
        self.sample(overridden, 1, positive=positive)
        concept = patch.concepts[0]
        # the positive calls' text attention (Krea 2 runs a negative prompt of another length in a call of its own)
        text_attention = [c for c in captured if self._is_text_attention(c, family)
                          and 0 in c[4].get("cond_or_uncond", [0])]
        errors = []
        joint = family.text_attention.text_tokens == "sequence_start"
        for (site, by_concept), (q, k, skip, heads, options) in zip(maps, text_attention):
            q, k = self._heads_first(q, skip, heads), self._heads_first(k, skip, heads)
            chunks = options.get("cond_or_uncond", [0])
            per_chunk = q.shape[0] // len(chunks)
            rows = slice(chunks.index(0) * per_chunk, (chunks.index(0) + 1) * per_chunk)   # the positive rows
            text = patch.prompt_length if joint else k.shape[2]
            image = by_concept[0].shape[1]
            image_q = q[rows, :, text:text + image] if joint else q[rows]
            logits = torch.einsum("bhnd,bhtd->bhnt", image_q.float(), k[rows, :, :text].float()) * q.shape[-1] ** -0.5
            reference = logits.softmax(dim=-1)[..., torch.tensor(concept.positions)].sum(-1).mean(1)
            errors.append(float((reference - by_concept[0]).abs().max() / reference.abs().max()))
        self.result["maps"] = {"sites": len(maps), "attention_calls": len(text_attention),
                               "max_relative_error": max(errors) if errors else None,
                               "positions": concept.positions}
        self.result["override_calls"] = len(captured)

    @staticmethod
    def _is_text_attention(call, family) -> bool:
        q, k, skip, heads, options = call
        if family.text_attention.text_tokens == "context":
            return k.shape[-2 if skip else 1] != q.shape[-2 if skip else 1] and k.shape[-2 if skip else 1] == 512
        return "block_index" in options and options.get("block_type") == "single"

    @staticmethod
    def _heads_first(t: torch.Tensor, skip: bool, heads: int) -> torch.Tensor:
        if skip:
            return t   # (B, H, L, D)
        b, length, width = t.shape
        return t.reshape(b, length, heads, width // heads).transpose(1, 2)

    def two_loras(self) -> None:
        second = self.write_lora("dit_second.safetensors", "kohya",
                                 self.block_layers(DIT_BLOCK_LAYERS[self.family_name]),
                                 seed=21)
        patched, positive = self.lag([(self.lora, "ohwx, woman", 1.0), (second, "zkz, dog", 1.0)])
        result = self.sample(patched, 2, positive=positive)
        patch = self.pack("nodes.host.lag_patch").LagPatch.of(patched)
        overlaps, shares = [], torch.zeros(2)
        for site, (one, other) in patch.bank.by_site.items():
            overlaps.append(float((one * other).sum()))
            shares += torch.stack([one.mean(), other.mean()]).cpu()
        preview = self.run_node("PerResLAGMaskPreview", model=patched, samples={"samples": result})[0]
        self.result["two"] = {"sites": len(patch.bank.by_site), "overlap": sum(overlaps),
                              "shares": shares.tolist(), "finite": bool(torch.isfinite(result).all()),
                              "preview": list(preview.shape)}
        # median masks: LAG lies between the base model and the LoRA merged
        single, positive = self.lag([(self.lora, "ohwx, woman", 1.0)])
        lag = self.sample(single, 2, positive=positive)
        base, full = self.sample(self.model, 2), self.sample(self.stock(self.lora), 2)
        self.result["median_share"] = float((lag - base).abs().mean() / (full - base).abs().mean())

    def composition(self) -> None:
        other = self.write_lora("dit_stock.safetensors", "kohya",
                                self.block_layers(DIT_BLOCK_LAYERS[self.family_name][-2:]),
                                seed=31)
        stocked = self.stock(other)
        zeros, positive = self.lag([(self.lora, "ohwx", 1.0)], model=stocked, constant=0.0)
        stocked_sample = self.sample(stocked, 1, positive=positive)
        ones, _ = self.lag([(self.lora, "ohwx", 1.0)], model=stocked, constant=1.0)
        both = self.sample(self.stock(self.lora, model=stocked), 1, positive=positive)
        calls = []

        def override(function, *args, **kwargs):
            calls.append(1)
            return function(*args, **kwargs) * 1.01
        overridden = self.model.clone()
        overridden.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
        zeros_o, _ = self.lag([(self.lora, "ohwx", 1.0)], model=overridden, constant=0.0)
        ones_o, _ = self.lag([(self.lora, "ohwx", 1.0)], model=overridden, constant=1.0)
        over_sample = self.sample(overridden, 1, positive=positive)
        self.result["composition"] = {
            "stock_zeros_identical": bool(torch.equal(self.sample(zeros, 1, positive=positive), stocked_sample)),
            "stock_ones": self.relative(self.sample(ones, 1, positive=positive), both, stocked_sample),
            "override_zeros_identical": bool(torch.equal(self.sample(zeros_o, 1, positive=positive), over_sample)),
            "override_ones": self.relative(self.sample(ones_o, 1, positive=positive),
                                           self.sample(self.stock(self.lora, model=overridden), 1, positive=positive),
                                           over_sample),
            "override_calls": len(calls)}

    def residuals_and_refusals(self) -> None:
        _, residuals, _, _ = self.train(steps=1, identifier="ohwx", class_word="woman")
        patched, positive = self.run_node("PerResLAGSampling", model=self.model, clip=self.clip, residuals=residuals,
                                          **LAG_DEFAULTS)
        result = self.sample(patched, 1, positive=positive)
        patch = self.pack("nodes.host.lag_patch").LagPatch.of(patched)
        self.result["residual_lag"] = {"finite": bool(torch.isfinite(result).all()),
                                       "positions": patch.concepts[0].positions, "sites": len(patch.bank.by_site)}
        other = {"Anima": "blocks_0_attn_wq", "Krea2": "blocks_0_cross_attn_q_proj"}[self.family_name]
        from safetensors.torch import save_file
        save_file({f"lora_unet_{other}.lora_down.weight": torch.zeros(4, 64),
                   f"lora_unet_{other}.lora_up.weight": torch.zeros(64, 4)},
                  self.lora_path("dit_other_family.safetensors"))
        concepts = self.run_node("PerResLAGLoRA", lora_name="dit_other_family.safetensors", trigger_words="ohwx",
                                 strength=1.0)[0]
        self.result["other_family"] = error_of(lambda: self.run_node(
            "PerResLAGSampling", model=self.model, clip=self.clip, extra_concepts=concepts, **LAG_DEFAULTS))


    def example_lag_workflow(self) -> None:
        """perres_<family>_lag_lora with random character LoRAs under the names it loads, in the workflow's own
        weight dtype (Krea 2 Turbo in fp8), after this process's fp32 model is released."""
        from workflow_runs import DIT_EXAMPLE_LORAS

        for seed, name in enumerate(DIT_EXAMPLE_LORAS[self.family_name]):
            self.write_lora(name, "kohya", self.block_layers(DIT_BLOCK_LAYERS[self.family_name]), seed=51 + seed)
        self.release()
        self.example_workflow(self.family_name, "lag_lora", "lag_workflow")


def main(family: str, host_root: str, workdir: str) -> None:
    checks = LagChecks(family, host_root, workdir)
    with torch.inference_mode():
        for check in (checks.ones_and_zeros, checks.maps_are_the_attentions, checks.two_loras, checks.composition):
            check()
    checks.residuals_and_refusals()
    checks.example_lag_workflow()
    checks.result["memory"] = memory_gib()
    sys.stdout.write("RESULT " + json.dumps(checks.result) + "\n")  # what the test reads
    sys.stdout.flush()


if __name__ == "__main__":
    main(*sys.argv[1:4])
