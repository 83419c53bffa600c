"""LAG on one diffusion-transformer family, measured in a process of its own (test_host_dit_lag.py runs it and
asserts on what it prints).

`python dit_lag_checks.py FAMILY HOST_ROOT WORKDIR` loads the random model of FAMILY through the stock loaders with
fp32 weights and compute (test_host_dit_lag.py says why), writes LoRA files on the blocks' attention and MLP
layers in the formats the host's loader reads for it (kohya names, diffusers/PEFT names, LoHa, LoKr, DoRA), and
prints one line `RESULT {json}` of numbers and messages: how far LAG with masks of ones is from
LoraLoaderModelOnly at 1 and 4 steps, whether masks of zeros are the base model bit for bit, how far the concept
maps are from the maps of the q and k the host hands its attention function, two LoRAs' mask overlap, LAG on a
stock-LoRA model and under another attention override, quantile and soft masks, the schedule window, a LoRA on
layers with no image locations, concept words of weighted and long prompts, what a joint sequence's text tokens
get (Krea 2), a PerRes residual through PerRes LAG Sampling, the mask
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
from lora_files import DIT_BEFORE_LAYERS, DIT_BLOCK_LAYERS, build_lora, write_lora  # noqa: E402

PROMPT = "a photo of ohwx woman and a zkz dog on a beach"
LAG_DEFAULTS = dict(prompt=PROMPT, concept_words="", strength=1.0, threshold="median", quantile=0.5,
                    start_percent=0.0, end_percent=1.0, outside_window="full residual")
BLOCKS = {"Anima": (0, 13, 27), "Krea2": (0, 1)}
# ΔW's entries about a tenth of W's (build_lora: scale·√(rank / fan-in) of W's spread, fan-in 2048 and up): far
# above the rounding of a weight merge, and small enough that the random models stay finite
LORA_SCALE = 2.5


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

    # --- LoRA files ------------------------------------------------------------------------------
    def write_lora(self, file_name: str, fmt: str, layers: list[str], seed: int, rank: int = 4) -> str:
        """A random LoRA in `fmt` on `layers`, under models/loras; LoKr in its low-rank form, as kohya_ss writes it
        for Anima."""
        tensors = build_lora(self.model, fmt, seed=seed, rank=rank, scale=LORA_SCALE, layers=layers,
                             low_rank_kronecker=True)
        return write_lora(os.path.dirname(self.lora_path(file_name)), file_name, tensors)

    def block_layers(self, parts) -> list[str]:
        return [f"blocks.{n}.{part}" for n in BLOCKS[self.family_name] for part in parts]

    # --- sampling ----------------------------------------------------------------------------
    def sample(self, model, steps: int = 1, seed: int = 3, positive=None) -> torch.Tensor:
        latent = self.run_node("EmptySD3LatentImage", width=64, height=64, batch_size=1)[0]
        return self.run_node("KSampler", model=model, seed=seed, steps=steps, cfg=4.0, sampler_name="euler",
                             scheduler="simple", positive=positive or self.positive, negative=self.negative,
                             latent_image=latent, denoise=1.0)[0]["samples"].float()

    def lag(self, chain, model=None, constant=None, window=(0.0, 1.0, "full"), prompt=PROMPT, **settings):
        """(patched model, positive) for LoRAs [(name, trigger words, strength)]: through PerRes LAG Sampling with
        its defaults, else through the function it calls with mask `settings` and a schedule `window` (start, end,
        what steps outside it use)."""
        concepts = None
        for name, words, strength in chain:
            concepts = self.run_node("PerResLAGLoRA", lora_name=name, trigger_words=words, strength=strength,
                                     concepts=concepts)[0]
        if constant is None and not settings and window == (0.0, 1.0, "full") and prompt == PROMPT:
            return self.run_node("PerResLAGSampling", model=model or self.model, clip=self.clip,
                                 extra_concepts=concepts, **LAG_DEFAULTS)
        mask_settings = self.pack("perres_core.lag").MaskSettings(constant=constant, **settings)
        return self.pack("nodes.lag_nodes").build_lag_model(model or self.model, self.clip, prompt, concepts,
                                                            mask_settings, *window)

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
        before = self.write_lora("dit_before.safetensors", "kohya",
                                 self.block_layers(DIT_BEFORE_LAYERS[self.family_name]), seed=11)
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

    def mask_settings(self) -> None:
        """Quantile and soft masks, the schedule window, and a LoRA on layers with no image locations."""
        patch_of = self.pack("nodes.host.lag_patch").LagPatch.of
        found = {}
        patched, positive = self.lag([(self.lora, "ohwx, woman", 1.0)], mode="quantile", quantile=0.25)
        self.sample(patched, 1, positive=positive)
        found["quantile_shares"] = [float(masks[0].mean()) for masks in patch_of(patched).bank.by_site.values()]
        patched, positive = self.lag([(self.lora, "ohwx, woman", 1.0)], mode="soft")
        soft = self.sample(patched, 1, positive=positive)
        values = torch.cat([masks[0].flatten().float() for masks in patch_of(patched).bank.by_site.values()])
        found["soft"] = {"min": float(values.min()), "max": float(values.max()),
                         "fractional": float(((values > 0) & (values < 1)).float().mean()),
                         "finite": bool(torch.isfinite(soft).all())}
        # one step runs at sampling progress 0: a window from 0.5 to 1 leaves it out
        base, stock = self.sample(self.model, 1), self.sample(self.stock(self.lora), 1)
        for outside in ("base", "full"):
            patched, positive = self.lag([(self.lora, "ohwx, woman", 1.0)], window=(0.5, 1.0, outside))
            result = self.sample(patched, 1, positive=positive)
            found[f"outside_{outside}"] = {"base_identical": bool(torch.equal(result, base)),
                                           "stock": self.relative(result, stock, base)}
        # a LoRA on the timestep embedding (and Anima's LLM adapter, Krea 2's text MLP) besides one block layer
        global_layers = {"Anima": ["t_embedder.1.linear_1", "llm_adapter.blocks.0.self_attn.q_proj"],
                         "Krea2": ["tproj.1", "txtmlp.1"]}[self.family_name]
        name = self.write_lora("dit_global.safetensors", "kohya", global_layers, seed=61)
        lag_concepts = self.pack("nodes.host.lag_concepts")
        _, notes = lag_concepts.lora_deltas(self.model, lag_concepts.load_lora_file(name), 1.0, name)
        patched, positive = self.lag([(name, "ohwx, woman", 1.0)])
        found["global"] = {"notes": notes,
                           "base_identical": bool(torch.equal(self.sample(patched, 1, positive=positive), base)),
                           "stock_effect": max_difference(self.sample(self.stock(name), 1), base)}
        self.result["settings"] = found

    def prompt_positions(self) -> None:
        """Where LAG finds the concept words among the denoiser's text tokens, for weighted and long prompts: the
        tokens there must be the words' own ids with the prompt's weights."""
        text_tokens, lag_nodes = self.pack("nodes.host.text_tokens"), self.pack("nodes.lag_nodes")
        family = self.pack("nodes.host.model").family_of_model(self.model)
        key = family.text_attention.prompt_tokens
        # the text encoder drops a template's opening tokens (Krea 2), Anima's denoiser sees every T5 token
        plain_tokens = sum(len(c) for c in text_tokens.prompt_token_chunks(self.clip, PROMPT, key))
        offset = 0 if family.text_attention.padded_to else plain_tokens - self.positive[0][0].shape[1]
        words = ["ohwx", "woman"]
        ids = {i for w in words for spelling in text_tokens.word_spellings(self.clip, w, key) for i in spelling}
        # the concept words are the prompts' only tokens of weight 1.2: where LAG must find them
        filler = ", ".join(["a quiet street with old houses and a garden"] * 30)
        prompts = {"weighted": "a photo of (ohwx woman:1.2) and a zkz dog on a beach",
                   "long": f"{filler}, and a photo of an (ohwx:1.2) (woman:1.2) on a beach"}
        found = {}
        for label, prompt in prompts.items():
            tokenized = self.clip.tokenize(prompt)[key]
            flat = [(int(t[0]), float(t[1])) for chunk in tokenized for t in chunk]
            chunks = text_tokens.prompt_token_chunks(self.clip, prompt, key)
            warnings = self.pack("nodes.node_warnings").NodeWarnings("test", None)
            positions = lag_nodes.locate_concept(self.clip, chunks, words, warnings, key, offset)
            found[label] = {"positions": positions, "tokens": len(flat),
                            "ids_match": all(flat[p + offset][0] in ids for p in positions),
                            "weighted": [i - offset for i, (_, weight) in enumerate(flat) if weight == 1.2]}
        if family.text_attention.padded_to:   # Anima: sample the long prompt (its encoder is small)
            patched, positive = self.lag([(self.lora, "ohwx, woman", 1.0)], prompt=prompts["long"])
            result = self.sample(patched, 1, positive=positive)
            patch = self.pack("nodes.host.lag_patch").LagPatch.of(patched)
            found["long"].update(lag_positions=patch.concepts[0].positions, finite=bool(torch.isfinite(result).all()),
                                 shares=[float(m[0].mean()) for m in patch.bank.by_site.values()])
        self.result["prompts"] = found

    def text_tokens_of_a_joint_sequence(self) -> None:
        """Krea 2: what a LoRA on the key projection gives the text and the image tokens of block 0's joint
        attention, read at the attention's QK norm (after every hook on the projections)."""
        if self.family_name != "Krea2":
            return
        name = self.write_lora("dit_keys.safetensors", "kohya", self.block_layers(("attn.wk",)), seed=71)
        patched, positive = self.lag([(name, "ohwx, woman", 1.0)])
        keys: list[torch.Tensor] = []
        handle = self.model.model.diffusion_model.blocks[0].attn.qknorm.register_forward_pre_hook(
            lambda module, args: keys.append(args[1].detach().float().clone()))
        try:
            runs = {}
            for label, model in (("base", self.model), ("stock", self.stock(name)), ("lag", patched)):
                keys.clear()
                self.sample(model, 1, positive=positive)
                runs[label] = keys[:]
        finally:
            handle.remove()
        patch = self.pack("nodes.host.lag_patch").LagPatch.of(patched)
        text, image = patch.prompt_length, next(iter(patch.bank.by_site.values()))[0].shape[1]
        # the positive prompt's call: its sequence is the prompt's text tokens, then the image tokens
        (base, stock, lag), = [(b, s, g) for b, s, g in zip(runs["base"], runs["stock"], runs["lag"])
                               if b.shape[2] == text + image]
        rows_base = (lag - base).abs().amax(dim=(1, 3))[:, text:]    # (batch, image tokens)
        rows_stock = (lag - stock).abs().amax(dim=(1, 3))[:, text:]
        effect = (stock - base).abs().amax(dim=(1, 3))[:, text:]
        self.result["joint_text"] = {
            "text": self.relative(lag[:, :, :text], stock[:, :, :text], base[:, :, :text]),
            "image_as_base": float((rows_base < 1e-3 * effect).float().mean()),
            "image_as_stock": float((rows_stock < 1e-3 * effect).float().mean())}

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
        for check in (checks.ones_and_zeros, checks.maps_are_the_attentions, checks.two_loras, checks.composition,
                      checks.mask_settings, checks.prompt_positions, checks.text_tokens_of_a_joint_sequence):
            check()
    checks.residuals_and_refusals()
    checks.example_lag_workflow()
    checks.result["memory"] = memory_gib()
    sys.stdout.write("RESULT " + json.dumps(checks.result) + "\n")  # what the test reads
    sys.stdout.flush()


if __name__ == "__main__":
    main(*sys.argv[1:4])
