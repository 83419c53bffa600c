"""Diffusion transformers in the real host, as users load them (issue 29's test models: Anima, Krea 2).

Each random model (tests/dit_models.py: the host's own module; Anima at its exact size, Krea 2 at its exact
width with 2 blocks) goes through the stock Load Diffusion Model in a process of its own, so its gigabytes never
sit beside the suite's other models: Anima in bf16 as released, Krea 2 with `weight_dtype` fp8_e4m3fn, how users
fit it on a 24 GB card. Until PerRes supports DiTs, every PerRes node that takes a model must refuse them with
the family message, never a traceback. On hosts without these models (ComfyUI 0.3.64) the tests skip and say so.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
pytestmark = [pytest.mark.slow, pytest.mark.first]  # 9 GB peaks in their own process: before the suite grows


# per model: the host module it needs, the weight_dtype it is loaded with, what the host must make of it
# (its model_sampling classes and shift, the stored dtype)
CASES = {
    "Anima": ("comfy.ldm.anima.model", "default", {"ModelSamplingDiscreteFlow", "CONST"}, 3.0, "torch.bfloat16"),
    "Krea2": ("comfy.ldm.krea2.model", "fp8_e4m3fn", {"ModelSamplingFlux", "CONST"}, 1.15, "torch.float8_e4m3fn"),
}


def host_has(host_root: str, module: str) -> bool:
    return os.path.isfile(os.path.join(host_root, *module.split(".")) + ".py")


@pytest.mark.parametrize("family", list(CASES))
def test_the_stock_loaders_detect_and_sample_the_random_dit_and_perres_refuses_it_clearly(family, host_root, tmp_path):
    from dit_models import COMPANIONS, DIT_TEST_MODELS, cached_dit_model

    module, weight_dtype, sampling_classes, shift, stored = CASES[family]
    if not host_has(host_root, module):
        pytest.skip(f"this ComfyUI has no {family} (added after 0.3.64)")
    (spec,) = [m for m in DIT_TEST_MODELS if m.config_name == family]
    text_encoder, clip_type, vae = COMPANIONS[family]
    for build in (lambda: cached_dit_model(spec), text_encoder.cached, vae.cached):
        build()  # built once, here, so the subprocess only loads
    script = textwrap.dedent(f"""
        import json, os, sys, torch
        sys.path.insert(0, {TESTS_DIR!r})
        import comfy_host
        comfy_host.start_host({host_root!r}, {str(tmp_path)!r})
        import folder_paths
        from comfy.cli_args import args
        from dit_models import COMPANIONS, DIT_TEST_MODELS, link_dit_model
        from host_helpers import untrained_residuals
        (spec,) = [m for m in DIT_TEST_MODELS if m.config_name == {family!r}]
        text_encoder, clip_type, vae_file = COMPANIONS[{family!r}]
        for folder, link in (("diffusion_models", lambda: link_dit_model(spec, {str(tmp_path)!r})),
                             ("text_encoders", lambda: text_encoder.link({str(tmp_path)!r})),
                             ("vae", lambda: vae_file.link({str(tmp_path)!r}))):
            link()
            _, extensions = folder_paths.folder_names_and_paths[folder]
            folder_paths.folder_names_and_paths[folder] = ([os.path.join({str(tmp_path)!r}, "models", folder)],
                                                           extensions)
        args.bf16_unet = True  # the released dtype; fp32 on the CPU would double the memory
        (model,) = comfy_host.run_node("UNETLoader", unet_name=spec.file_name, weight_dtype={weight_dtype!r})
        (clip,) = comfy_host.run_node("CLIPLoader", clip_name=text_encoder.file_name, type=clip_type)
        (vae,) = comfy_host.run_node("VAELoader", vae_name=vae_file.file_name)
        (positive,) = comfy_host.run_node("CLIPTextEncode", clip=clip, text="a photo of a sks dog")
        (negative,) = comfy_host.run_node("CLIPTextEncode", clip=clip, text="")
        (latent,) = comfy_host.run_node("EmptySD3LatentImage", width=64, height=64, batch_size=1)
        (sampled,) = comfy_host.run_node("KSampler", model=model, seed=0, steps=1, cfg=4.0, sampler_name="euler",
                                         scheduler="simple", positive=positive, negative=negative,
                                         latent_image=latent, denoise=1.0)
        (image,) = comfy_host.run_node("VAEDecode", samples=sampled, vae=vae)
        sampling = model.get_model_object("model_sampling")
        unet = model.model.diffusion_model
        refusals = {{}}
        residuals = untrained_residuals(0)
        for node, inputs in (("PerResApplyResiduals", dict(model=model, residuals=residuals, strength=1.0)),
                             ("PerResLAGSampling", dict(model=model, clip=clip, prompt="a sks dog", concept_words="",
                                                        strength=1.0, threshold="median", quantile=0.5,
                                                        start_percent=0.0, end_percent=1.0,
                                                        outside_window="full residual", residuals=residuals))):
            try:
                comfy_host.run_node(node, **inputs)
                refusals[node] = None
            except Exception as exc:
                refusals[node] = f"{{type(exc).__name__}}: {{exc}}"
        print("RESULT " + json.dumps(dict(
            config=type(model.model.model_config).__name__, sampling=[c.__name__ for c in type(sampling).__mro__],
            shift=float(sampling.shift), parameters=sum(p.numel() for p in unet.parameters()),
            dtype=str(next(unet.parameters()).dtype), refusals=refusals,
            latent=list(sampled["samples"].shape), latent_finite=bool(torch.isfinite(sampled["samples"]).all()),
            image=list(image.shape), image_finite=bool(torch.isfinite(image).all()))))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COMFYUI_PATH": host_root})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["config"] == family
    # flow matching: the host's flow schedule with the family's shift, rectified-flow (CONST) prediction
    assert sampling_classes <= set(result["sampling"]) and result["shift"] == pytest.approx(shift), result
    assert result["parameters"] == spec.parameters and result["dtype"] == stored, result
    # the stock text encoder, sampler and VAE run on it: one euler step at 64 px, decoded to a finite picture
    assert result["latent_finite"] and result["image_finite"] and result["image"][-3:] == [64, 64, 3], result
    for node, display in (("PerResApplyResiduals", "PerRes Apply Residuals"),
                          ("PerResLAGSampling", "PerRes LAG Sampling")):
        message = result["refusals"][node]
        expected = f"PerResError: {display}: the model is {family}; PerRes supports SD1.x"
        assert message and message.startswith(expected), message
        assert "SDXL" in message, message
