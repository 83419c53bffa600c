"""Diffusion transformers in the real host, as users load them (issue 29's test models, first: Anima).

The random Anima model (tests/anima_checkpoint.py: the host's own module, exact size) goes through the stock
Load Diffusion Model in a process of its own, so its 4 GB never sit beside the suite's other models. Until
PerRes supports DiTs, every PerRes node that takes a model must refuse it with the family message, never a
traceback. On hosts without Anima (ComfyUI 0.3.64) the test skips and says so.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
pytestmark = [pytest.mark.slow, pytest.mark.first]  # 9 GB peak in its own process: before the suite grows


def host_has(host_root: str, module: str) -> bool:
    return os.path.isfile(os.path.join(host_root, *module.split(".")) + ".py")


def test_load_diffusion_model_detects_the_random_anima_and_perres_refuses_it_clearly(host_root, tmp_path):
    if not host_has(host_root, "comfy.ldm.anima.model"):
        pytest.skip("this ComfyUI has no Anima (added after 0.3.64)")
    from anima_checkpoint import ANIMA_NAME, cached_anima_model

    cached_anima_model()  # built once, here, so the subprocess only loads
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {TESTS_DIR!r})
        import comfy_host
        comfy_host.start_host({host_root!r}, {str(tmp_path)!r})
        import folder_paths
        from comfy.cli_args import args
        from anima_checkpoint import link_anima_model
        from host_helpers import untrained_residuals
        link_anima_model({str(tmp_path)!r})
        _, extensions = folder_paths.folder_names_and_paths["diffusion_models"]
        folder_paths.folder_names_and_paths["diffusion_models"] = ([{str(tmp_path / "models" / "diffusion_models")!r}],
                                                                   extensions)
        args.bf16_unet = True  # the released dtype; fp32 on the CPU would take 8 GB
        (model,) = comfy_host.run_node("UNETLoader", unet_name={ANIMA_NAME!r}, weight_dtype="default")
        sampling = model.get_model_object("model_sampling")
        unet = model.model.diffusion_model
        refusals = {{}}
        residuals = untrained_residuals(0)
        for node, inputs in (("PerResApplyResiduals", dict(model=model, residuals=residuals, strength=1.0)),
                             ("PerResLAGSampling", dict(model=model, clip=None, prompt="a sks dog", concept_words="",
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
            dtype=str(next(unet.parameters()).dtype), refusals=refusals)))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COMFYUI_PATH": host_root})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["config"] == "Anima"
    # flow matching: the host's discrete-flow schedule with Anima's shift, rectified-flow (CONST) prediction
    assert {"ModelSamplingDiscreteFlow", "CONST"} <= set(result["sampling"]) and result["shift"] == 3.0, result
    assert result["parameters"] == 2_091_068_928 and result["dtype"] == "torch.bfloat16", result
    for node, display in (("PerResApplyResiduals", "PerRes Apply Residuals"),
                          ("PerResLAGSampling", "PerRes LAG Sampling")):
        message = result["refusals"][node]
        assert message and message.startswith(f"PerResError: {display}: the model is Anima; PerRes supports SD1.x"), \
            message
        assert "SDXL" in message, message
