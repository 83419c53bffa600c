"""Running an example workflow in the tests (test_workflows.py; the DiT workflows in their own process,
dit_training_checks.py): the workflow made cheap, and what went wrong when it failed."""
from __future__ import annotations

import copy
import os

TEST_RESOLUTION = 64
TEST_STEPS = 2
# Workflows that train with snapshot_every > 0 snapshot every step in the tests: TEST_STEPS snapshots.
TEST_SNAPSHOT_EVERY = 1
# Workflows of diffusion transformers → the host's model class (tests/dit_models.py); they run on the random
# DiT in a process of their own, and not at all on hosts older than the family.
DIT_WORKFLOWS = {"perres_anima_train_and_sample": "Anima", "perres_krea2_train_and_sample": "Krea2",
                 "perres_anima_lag_lora": "Anima", "perres_krea2_lag_lora": "Krea2"}
# The two character LoRAs each DiT LAG workflow loads; the tests write random stand-ins under these names.
DIT_EXAMPLE_LORAS = {"Anima": ("character_a_anima.safetensors", "character_b_anima.safetensors"),
                     "Krea2": ("character_a_krea2.safetensors", "character_b_krea2.safetensors")}
_HOST_MODULES = {"Anima": "comfy/ldm/anima/model.py", "Krea2": "comfy/ldm/krea2/model.py"}


def host_lacks_family(name: str, host_root: str) -> bool:
    """Whether workflow `name` is of a DiT family this host does not have (0.3.64 has neither)."""
    family = DIT_WORKFLOWS.get(name)
    return family is not None and not os.path.isfile(os.path.join(host_root, _HOST_MODULES[family]))


def for_tests(name: str, prompt: dict, files: dict[str, str], residuals: dict[str, str]) -> dict:
    """The workflow made cheap: the test models (`files`: loader input, e.g. ckpt_name or unet_name → file),
    64 px, 2 steps, stand-in residuals, its own output folder."""
    prompt = copy.deepcopy(prompt)
    for node_id, node in prompt.items():
        inputs = node["inputs"]
        for key, value in list(inputs.items()):
            if isinstance(value, list):
                continue  # a link
            if key in files:
                inputs[key] = files[key]
            elif key in ("width", "height", "resolution"):
                inputs[key] = TEST_RESOLUTION
            elif key == "steps" and node["class_type"] in ("KSampler", "PerResTrainResiduals"):
                inputs[key] = TEST_STEPS
            elif key == "residual_name":
                assert value in residuals, f"{name}: node {node_id} loads '{value}'; add it to RESIDUALS"
                inputs[key] = residuals[value]
            elif key == "snapshot_every" and value:
                inputs[key] = TEST_SNAPSHOT_EVERY
            elif (key == "filename_prefix" and node["class_type"] in ("SaveImage", "PerResSaveResiduals")
                  or key == "snapshot_prefix"):
                # (LossGraphNode writes into the temp folder itself and cannot create subfolders)
                inputs[key] = f"workflow_tests/{name}/{value.replace('/', '_')}"
    return prompt


def failure_report(executor) -> str:
    lines = []
    for event, data in executor.status_messages:
        if event in ("execution_error", "execution_interrupted"):
            lines.append(f"{event}: node {data.get('node_id')} ({data.get('node_type')}): "
                         f"{data.get('exception_type')}: {data.get('exception_message')}\n"
                         + "".join(data.get("traceback") or []))
    return "\n".join(lines) or str(executor.status_messages)
