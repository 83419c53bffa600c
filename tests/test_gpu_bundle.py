"""The lent-GPU-machine bundle and check (tools/gpu_bundle.py, gpu_check.py) without a GPU.

The bundle itself (a download and a minute of xz) and the rehearsal (benchmarks/gpu_rehearse.sh, 15 minutes)
are too slow for CI; what is checked here is what decides whether they work: every requirement of the host
under test is accounted for, the bundle leaves out what it says, and a check cut short or broken midway
still reports what it measured.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

from comfy_host import PACK_DIR

def load_script(folder: str, name: str):
    path = os.path.join(PACK_DIR, folder, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"perres_{folder}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bundle():
    return load_script("tools", "gpu_bundle")


def test_every_requirement_of_the_host_is_on_the_machine_carried_or_left_out_on_purpose(bundle, host_root):
    with open(os.path.join(host_root, "requirements.txt"), encoding="utf-8") as handle:
        requirements = handle.read()
    assert bundle.requirement_names(requirements), "no requirement parsed from the host's requirements.txt"
    assert bundle.unplaced_requirements(requirements) == []
    device_side = bundle.device_side_requirements(requirements)
    assert "torch==2.11.0" in device_side and not set(device_side) & set(bundle.CARRIED_WHEELS)


def test_requirement_parsing_and_what_is_unplaced(bundle):
    text = "# comment\ntorch\nPyYAML>=6\n-r other.txt\nComfy_Aimdo==0.4.13  # pinned\nav[video]; python_version>'3'\n" \
           "some-new-package\n"
    assert bundle.requirement_names(text) == ["torch", "pyyaml", "comfy-aimdo", "av", "some-new-package"]
    assert bundle.unplaced_requirements(text) == ["some-new-package"]


def test_the_bundle_leaves_out_what_it_says(bundle):
    for path in (".git", ".git/config", "models/checkpoints", "custom_nodes/Other", "user/default", "__pycache__",
                 "comfy/__pycache__", "tests-unit/x.py"):
        assert bundle.excluded(path), path
    for path in ("comfy/model_patcher.py", "nodes.py", "comfy_extras/nodes_train.py", "app/models.py"):
        assert not bundle.excluded(path), path


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("benchmarks", "gpu_check")


def test_a_failing_phase_is_recorded_and_the_next_ones_still_run(gpu_check, tmp_path):
    path = str(tmp_path / "check.json")
    report = gpu_check.Report(path, {"families": {}}, deadline=0)
    section: dict = {}

    def broken() -> dict:
        raise RuntimeError("CUDA out of memory")

    assert report.phase(section, "perres_plain", broken) is None
    assert report.phase(section, "perres_ckpt", lambda: {"seconds": 1.5, "steps": 150}) == {"seconds": 1.5,
                                                                                          "steps": 150}
    assert section["perres_plain"] == {"error": "RuntimeError: CUDA out of memory"}
    report.data["families"]["sd15"] = section
    report.save()
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    assert saved["families"]["sd15"]["perres_ckpt"]["seconds"] == 1.5


def test_phases_past_the_deadline_are_skipped_and_saved(gpu_check, tmp_path):
    path = str(tmp_path / "check.json")
    section: dict = {}
    report = gpu_check.Report(path, {"families": {"sdxl": section}}, deadline=1e-9)
    ran = []
    assert report.phase(section, "sampling", lambda: ran.append(1) or {"seconds": 1.0}) is None
    assert not ran and "skipped" in section["sampling"]
    with open(path, encoding="utf-8") as handle:
        assert "skipped" in json.load(handle)["families"]["sdxl"]["sampling"]


def test_targets_of_a_partial_run_say_what_was_not_measured(gpu_check):
    plan = gpu_check.plans(gpu_check.parse_args(["--families", "sdxl", "--sdxl-train-steps", "20"]))[0]
    assert plan.train_steps == 20 and plan.resolution == 1024
    section = {"perres_plain": {"seconds": 10.0, "steps": 20}, "perres_ckpt": {"error": "x"},
               "sampling": {"apply": {"seconds": 2.0}, "lag": {"seconds": 2.2}}}
    found = gpu_check.targets(plan, section)
    assert found["perres_ckpt_peak_gib"]["value"] is None
    assert found["lag_over_apply"]["value"] == pytest.approx(1.1)
    assert found["lag_lora_over_merged_lora"]["value"] is None
    assert gpu_check.per_150_steps(section["perres_plain"]) == pytest.approx(75.0)


def test_the_perres_training_phase_runs_the_node_as_it_is(gpu_check, sd15, concept_images):
    """The check's PerRes phase calls PerRes Train Residuals with the node's current inputs and outputs (one
    step at 64 px), so a lent machine's run does not stop at a changed node."""
    import math

    plan = gpu_check.FamilyPlan(family="sd15", resolution=64, train_steps=1, sample_steps=1, sample_repeats=1,
                                sampler="ddim", scheduler="ddim_uniform", peak_target_gib=6.0, lag_lora_target=1.25,
                                plain_150_target_s=None)
    model, clip, vae = sd15
    held: dict = {}
    result = gpu_check.train_perres(model, clip, vae, concept_images, plan, 2, False, held)
    assert result["steps"] == 1 and math.isfinite(result["final_loss"]), result
    assert held["residuals"].parameter_count() > 0
