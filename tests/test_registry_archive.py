"""The Comfy Registry's own checks, offline: `comfy node validate` passes, and `comfy node pack` (git-tracked files
minus .comfyignore, plus [tool.comfy] includes) carries what ComfyUI loads and nothing of the development tree.

comfy-cli lives in a venv of its own (.ci/install-comfy-cli, which .ci/run calls and exports as
PERRES_COMFY_CLI); these tests skip, saying so, only where it is absent.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import zipfile

import pytest

from comfy_host import PACK_DIR

LOADED = ("__init__.py", "pyproject.toml", "requirements.txt", "LICENSE", "README.md", "nodes/__init__.py",
          "nodes/host/entry_points.py", "perres_core/families.py", "web/docs/PerResTrainResiduals.md",
          "example_workflows/perres_train_and_sample.json", "example_workflows/api/perres_train_and_sample.json",
          "example_images/perres_example/01_meadow.png")
DEVELOPMENT = ("tests/", "benchmarks/", "tools/", ".ci/", "docs/")


@pytest.fixture(scope="module")
def comfy_cli() -> str:
    found = os.environ.get("PERRES_COMFY_CLI") or shutil.which("comfy")
    if not found:
        pytest.skip("comfy-cli not installed: run .ci/install-comfy-cli (bash .ci/run does)")
    return found


def run_cli(comfy: str, cwd: str, home: str, *args: str) -> subprocess.CompletedProcess:
    # A throwaway HOME and no tracking: comfy-cli writes its config under HOME; RUFF_NO_CACHE keeps the pack clean
    env = {**os.environ, "HOME": home, "DO_NOT_TRACK": "1", "RUFF_NO_CACHE": "1"}
    return subprocess.run([comfy, "--skip-prompt", "--no-enable-telemetry", "--no-json", "node", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def pack_files() -> list[str]:
    """The files git tracks, or would (untracked and not ignored): what a commit of this tree holds."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=PACK_DIR, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    return [name for name in listed if os.path.isfile(os.path.join(PACK_DIR, name))]


def test_comfy_node_validate_passes(comfy_cli, tmp_path):
    done = run_cli(comfy_cli, PACK_DIR, str(tmp_path), "validate")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "All validation checks passed" in output and "Warning" not in output, output


def test_the_registry_archive_holds_what_comfyui_loads_and_no_development_files(comfy_cli, tmp_path):
    tree = tmp_path / "pack"
    for name in pack_files():
        target = tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(PACK_DIR, name), target)
    for command in (["init", "-q"], ["add", "-A"]):
        subprocess.run(["git", *command], cwd=tree, check=True, capture_output=True)
    done = run_cli(comfy_cli, str(tree), str(tmp_path / "home"), "pack")
    assert done.returncode == 0, done.stdout + done.stderr
    with zipfile.ZipFile(tree / "node.zip") as archive:
        names = set(archive.namelist())
    for name in LOADED:
        assert name in names, f"{name} is not in the Registry archive"
    leaked = sorted(name for name in names if name.startswith(DEVELOPMENT) or name in (".comfyignore", ".gitignore"))
    assert not leaked, f"development files in the Registry archive: {leaked[:10]}"
    assert not any(name.endswith((".pyc", ".safetensors")) for name in names)
