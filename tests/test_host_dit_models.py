"""PerRes on diffusion transformers in the real host (issue 29): Anima and Krea 2, as users load them.

Each family's random model (tests/dit_models.py: the host's own module; Anima at its exact size, Krea 2 at its
exact width with 2 blocks) goes through the stock Load Diffusion Model, Load CLIP and Load VAE in a process of its
own (tests/dit_training_checks.py), so its gigabytes never sit beside the suite's other models: Anima in bf16 as
released (and once with fp8 weights), Krea 2 with `weight_dtype` fp8_e4m3fn, how users fit it on a 24 GB card.
That process samples, trains and applies at 64 px and prints what it measured; the tests here judge it against
the SDXL invariants. On hosts without these models (ComfyUI 0.3.64) the tests skip and say so.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import pack

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
pytestmark = [pytest.mark.slow, pytest.mark.first]  # 10 GB peaks in their own process: before the suite grows

# per model: the host module it needs, its PerRes family, what the host must make of it (model_sampling
# classes and shift, the stored dtype), and the depth of the test model
CASES = {
    "Anima": ("comfy.ldm.anima.model", "Anima", {"ModelSamplingDiscreteFlow", "CONST"}, 3.0, "torch.bfloat16"),
    "Krea2": ("comfy.ldm.krea2.model", "Krea 2", {"ModelSamplingFlux", "CONST"}, 1.15, "torch.float8_e4m3fn"),
}
DEPTH = {"Anima": {"num_blocks": 28}, "Krea2": {"layers": 2}}


def host_has(host_root: str, module: str) -> bool:
    return os.path.isfile(os.path.join(host_root, *module.split(".")) + ".py")


def measured_in_own_process(script: str, config_name: str, host_root: str, workdir: str) -> tuple:
    """(the test model's spec, what tests/`script` measured on config_name's model in a process of its own), or a
    skip on a host without the family. Every file it loads is built here first (once, cached), so the process
    only loads: the family's model, text encoder and VAE, and the other DiT's text encoder."""
    from dit_models import COMPANIONS, DIT_TEST_MODELS, cached_dit_model

    if not host_has(host_root, CASES[config_name][0]):
        pytest.skip(f"this ComfyUI has no {config_name} (added after 0.3.64)")
    (spec,) = [m for m in DIT_TEST_MODELS if m.config_name == config_name]
    text_encoder, _, vae = COMPANIONS[config_name]
    other_text_encoder = COMPANIONS["Krea2" if config_name == "Anima" else "Anima"][0]
    for build in (lambda: cached_dit_model(spec), text_encoder.cached, vae.cached, other_text_encoder.cached):
        build()
    done = subprocess.run([sys.executable, os.path.join(TESTS_DIR, script), config_name, host_root, workdir],
                          capture_output=True, text=True, timeout=1800, env={**os.environ, "COMFYUI_PATH": host_root})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-3000:] + done.stderr[-5000:]
    return spec, json.loads(lines[0][len("RESULT "):])


@pytest.fixture(scope="module", params=list(CASES))
def measured(request, host_root, tmp_path_factory):
    """(config name, family, what dit_training_checks.py measured on that family's model)."""
    config_name = request.param
    spec, result = measured_in_own_process("dit_training_checks.py", config_name, host_root,
                                           str(tmp_path_factory.mktemp(f"dit-{config_name}")))
    family = pack("perres_core.families").family_named(CASES[config_name][1])
    return config_name, family, spec, result


def test_the_stock_loaders_detect_and_sample_the_random_dit(measured):
    config_name, family, spec, result = measured
    _, _, sampling_classes, shift, stored = CASES[config_name]
    assert result["config"] == config_name
    # flow matching: the host's flow schedule with the family's shift, rectified-flow (CONST) prediction
    assert sampling_classes <= set(result["sampling"]) and result["shift"] == pytest.approx(shift), result
    assert result["model_parameters"] == spec.parameters and result["weight_dtype"] == stored, result
    # the stock text encoder, sampler and VAE run on it: one euler step at 64 px, decoded to a finite picture
    assert result["latent_finite"] and result["image_finite"] and result["image"][-3:] == [64, 64, 3], result


def test_perres_recognises_the_family_its_layers_rank_and_flow_schedule(measured):
    config_name, family, _, result = measured
    layers = family.residual_layers(DEPTH[config_name])
    assert result["family"] == family.name
    assert result["layers"] == sorted(layer.path for layer in layers)
    # the rank keeps the paper's share of the released model, whatever depth the loaded one has
    assert result["ranks"] == [family.rank(family.layers[0])] == [{"Anima": 6, "Krea2": 19}[config_name]]
    assert result["parameters"] == sum(result["ranks"][0] * (layer.out_features + layer.in_features)
                                         for layer in layers)
    assert result["prediction"] == "flow" and result["levels"] == {"Anima": 1000, "Krea2": 10000}[config_name]
    assert result["context"][-1] == {"Anima": 1024, "Krea2": family.context_width}[config_name], result["context"]
    # the Wan VAE reads a batch as one clip's frames: each of the 4 images must be a latent of its own
    assert result["latents"] == [4, 16, 8, 8], result["latents"]


def test_checkpointing_seeds_and_masks_of_ones_change_nothing(measured):
    _, _, _, result = measured
    assert result["checkpointing_factor_difference"] <= 1e-5, result["checkpointing_factor_difference"]
    plain, checkpointed = result["checkpointing_losses"]
    assert checkpointed == pytest.approx(plain, rel=1e-5)
    assert result["training_changed"] > 0, "training changed nothing"
    assert result["masks_of_ones_difference"] == 0
    assert result["same_seed_same_bytes"]


def test_training_lowers_the_held_out_flow_loss(measured):
    _, _, _, result = measured
    before, after = result["held_out"]
    assert after < before * 0.995, f"held-out flow loss did not drop: {before:.5f} → {after:.5f}"


def test_the_file_is_a_lora_the_stock_loader_applies_exactly_as_apply(measured):
    config_name, family, _, result = measured
    layers = family.residual_layers(DEPTH[config_name])
    assert result["file_layers"] == sorted(layer.lora_name for layer in layers)
    assert result["metadata"] == {"modelspec.architecture": family.modelspec_architecture,
                                  "modelspec.implementation": "https://github.com/comfyanonymous/ComfyUI",
                                  "ss_base_model_version": family.kohya_base_version,
                                  "perres.base_model": family.name}
    assert result["keys_not_loaded"] == []
    expected = sorted(f"diffusion_model.{layer.path}.weight" for layer in layers)
    assert result["stock_patches"] == result["apply_patches"] == expected
    assert result["stock_vs_apply"] == 0.0   # one merge, by the same host code
    assert result["apply_vs_base"] > 1e-3, "the residual changed nothing"
    assert result["load_node_text"].startswith(f"{family.name} residual 'sks dog'")
    assert f"use it on {family.name} models" in result["load_node_text"]


def test_continuing_snapshots_buckets_and_previews_work_as_on_sdxl(measured):
    _, _, _, result = measured
    assert result["continued_steps"] == [3, 2]
    assert result["snapshots"] == 1
    # a preview at the one step, 64 px, from the family's latent-to-RGB factors (Wan 2.1's)
    assert [p for p in result["previews"] if p is not None] == [[8, 8]], result["previews"]
    assert result["buckets"] and "×" in result["buckets"] and "," in result["buckets"], result["buckets"]


def test_wrong_parts_are_refused_with_what_to_load(measured):
    config_name, family, _, result = measured
    refusals = result["refusals"]
    assert f"trained on an SD1.x model, but this model is {family.name}" in refusals["sd1_residual"]
    assert refusals["sd_vae_latent"].startswith("PerResError: the VAE gives latents of shape (1, 4, 8, 8)")
    assert "Wan 2.1 VAE" in refusals["sd_vae_latent"]
    assert refusals["other_text_encoder"].startswith("PerResError: PerRes Train Residuals: the CLIP gives")
    assert family.text_encoder in refusals["other_text_encoder"]


def test_fp8_weights_train_and_a_residual_applies_to_another_checkpoint_of_the_family(measured):
    config_name, _, _, result = measured
    if config_name == "Krea2":
        assert result["weight_dtype"] == "torch.float8_e4m3fn"  # every check above trained on fp8 weights
        return
    assert result["fp8_weights"] == "torch.float8_e4m3fn"
    assert result["fp8_factors_finite"] and result["fp8_changed"]
    assert result["other_checkpoint_sample_finite"]


def test_the_suggester_ranks_class_words_on_the_dit(measured):
    _, _, _, result = measured
    best, ranking = result["suggested"]
    assert best in ("dog", "toy") and "dog" in ranking and "toy" in ranking, result["suggested"]


def test_the_example_workflow_runs_through_the_executor(measured):
    _, _, _, result = measured
    valid, error, node_errors = result["workflow_valid"]
    assert valid, f"ComfyUI rejects the prompt: {error} {node_errors}"
    workflow = result["workflow"]
    assert workflow["success"], workflow["failure"]
    kinds = sorted(workflow["outputs"].values())
    assert kinds == ["LossGraphNode", "PerResSaveResiduals", "PreviewImage", "SaveImage"], kinds
    # at the tests' 64 px the trainer rightly warns that the family trains at 1024 px; nothing else
    unexpected = [w for w in workflow["warnings"] if "at 64 px" not in w]
    assert not unexpected, unexpected
