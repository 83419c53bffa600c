"""`bash .ci/run` on a machine without ComfyUI provisions the host itself (README "Running the tests").

No GitHub: the repository it clones is made from the files of the host under test, HOME is a temporary
folder, and the new venv reuses this host's installed packages through PERRES_CI_REUSE_SITE_PACKAGES
instead of downloading torch again (pip fetches only what the host lacks, e.g. torchaudio for 0.3.64).
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sysconfig

import pytest

from conftest import PACK_DIR

CI_RUN = os.path.join(PACK_DIR, ".ci", "run")

pytestmark = pytest.mark.skipif(os.path.basename(os.path.dirname(PACK_DIR)) == "custom_nodes",
                                reason=".ci/run tests the ComfyUI that holds this checkout, it provisions none")


def ci_env(home, **extra) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in ("COMFYUI_PATH", "PERRES_CI_HOSTS_FILE", "PERRES_CI_REUSE_SITE_PACKAGES")}
    # pip keeps its usual cache (HOME moves it otherwise): a requirement the host lacks (0.3.64 runs without
    # torchaudio) is fetched from PyPI once, not on every run
    cache = os.environ.get("PIP_CACHE_DIR", os.path.expanduser("~/.cache/pip"))
    return {**env, "HOME": str(home), "PIP_CACHE_DIR": cache, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def git(*args, cwd=None) -> str:
    identity = ["-c", "user.name=PerRes tests", "-c", "user.email=tests@perres.invalid"]
    return subprocess.run(["git", *identity, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def host_repository(host_root: str, target) -> str:
    """A git repository holding the host's files (as its .gitignore selects them); returns its commit.

    The host is only read: its files are added through --work-tree into a repository elsewhere.
    """
    git("init", "-q", str(target))
    git_dir = os.path.join(str(target), ".git")
    with open(os.path.join(git_dir, "info", "exclude"), "a") as exclude:
        exclude.write(".venv/\nvenv/\n__pycache__/\n*.pyc\n")
    git("--git-dir", git_dir, "--work-tree", host_root, "add", "-A")
    git("--git-dir", git_dir, "--work-tree", host_root, "commit", "-q", "-m", "host files")
    return git("--git-dir", git_dir, "rev-parse", "HEAD")


def host_version(root: str) -> str:
    with open(os.path.join(root, "comfyui_version.py")) as f:
        return f.read().split('__version__ = "')[1].split('"')[0]


@pytest.mark.slow
def test_ci_run_clones_and_sets_up_a_missing_host(host_root, tmp_path):
    commit = host_repository(host_root, tmp_path / "ComfyUI.git")
    version = host_version(host_root)
    hosts_file = tmp_path / "comfyui-hosts"
    hosts_file.write_text(f"# name version commit directory\nlocal {version} {commit} ~/ComfyUI\n")
    home = tmp_path / "home"
    home.mkdir()
    env = ci_env(home, COMFYUI_GIT_URL=str(tmp_path / "ComfyUI.git"), PERRES_CI_HOSTS_FILE=str(hosts_file),
                 PERRES_CI_REUSE_SITE_PACKAGES=sysconfig.get_path("purelib"))

    # a host-free test file: the run still starts the new host in-process and loads the pack into it
    run = subprocess.run(["bash", CI_RUN, "tests/test_core_lag.py"], cwd=PACK_DIR, env=env, capture_output=True,
                         text=True, timeout=600, stdin=subprocess.DEVNULL)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    new_host = str(home / "ComfyUI")
    assert git("-C", new_host, "rev-parse", "HEAD") == commit
    assert os.path.isfile(os.path.join(new_host, ".venv", "bin", "python"))
    assert not os.path.exists(os.path.join(new_host, ".venv", "perres-ci-incomplete"))
    own_torch = glob.glob(os.path.join(new_host, ".venv", "lib", "*", "site-packages", "torch"))
    assert not own_torch, "torch was installed again instead of reused"
    assert f"ComfyUI {version} at {new_host}, python {new_host}/.venv/bin/python" in output, output[-4000:]
    with open(os.path.join(PACK_DIR, "tests", "test_core_lag.py")) as f:  # parametrized ones run more than once
        test_functions = f.read().count("\ndef test_")
    summary = re.search(rf"local {re.escape(version)} \(ComfyUI {re.escape(version)}, {re.escape(new_host)}, "
                        r"tests: all\): passed in \d+ min \d+ s: (\d+) passed in", output)
    assert summary and int(summary.group(1)) >= test_functions, output[-4000:]

    probe = subprocess.run([os.path.join(new_host, ".venv", "bin", "python"), "-c",
                            "from comfy.cli_args import args; args.cpu = True; import comfy.model_management, nodes; "
                            "print(comfy.model_management.get_torch_device())"],
                           cwd=new_host, env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0 and probe.stdout.strip().endswith("cpu"), probe.stderr[-3000:]


def test_ci_run_without_a_reachable_comfyui_says_how_to_use_an_existing_one(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = ci_env(home, COMFYUI_GIT_URL=str(tmp_path / "no-such-repository"))
    run = subprocess.run(["bash", CI_RUN], cwd=PACK_DIR, env=env, capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "could not clone ComfyUI" in run.stderr and "COMFYUI_PATH=/path/to/ComfyUI bash .ci/run" in run.stderr
    assert os.listdir(home) == [], "a failed clone left files behind"


def test_tested_range_is_stated_where_users_read_it():
    """The pinned hosts are the range that pyproject's requires-comfyui and README "Install" promise."""
    with open(os.path.join(PACK_DIR, ".ci", "comfyui-hosts")) as f:
        pinned = [line.split() for line in f if line.strip() and not line.startswith("#")]
    versions = sorted((row[1] for row in pinned), key=lambda v: tuple(int(part) for part in v.split(".")))
    assert len(pinned) >= 2 and all(len(row[2]) == 40 for row in pinned), pinned
    oldest, newest = versions[0], versions[-1]
    # a floor only: an upper bound makes ComfyUI-Manager disable the pack for everyone who updates ComfyUI
    with open(os.path.join(PACK_DIR, "pyproject.toml")) as f:  # (tomllib needs Python 3.11; the pack 3.10)
        assert re.findall(r'^requires-comfyui = "(.*)"', f.read(), re.M) == [f">={oldest}"]
    with open(os.path.join(PACK_DIR, "README.md")) as f:
        install = f.read().split("## Install")[1].split("\n## ")[0]
    assert f"Requires ComfyUI {oldest} or newer" in install
    assert f"tested against ComfyUI **{oldest}**" in install and f"**{newest}**" in install
