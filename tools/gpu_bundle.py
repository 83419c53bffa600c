"""Fill .gpu_bundle/ with what a lent GPU machine lacks to run benchmarks/gpu_check.py (run here, once).

A lent GPU machine starts bare: Python 3.12 with torch (CUDA) and a fixed set of packages (the device
tool's KINDS.md, copied into DEVICE_PACKAGES below), no ComfyUI, no network, and it receives only the
checkout's working tree plus the ignored paths a call names (64 MiB in all). This script makes the one
ignored folder such a call carries:

  .gpu_bundle/bundle.tar.xz   ComfyUI/ (the pinned "newest" host of .ci/comfyui-hosts, without .git,
                              models, .venv, user data) and wheels/ (CARRIED_WHEELS: ComfyUI's requirements
                              the machine lacks, for CPython 3.12 manylinux x86-64, re-zipped uncompressed
                              so that xz, not zip, compresses them)
  .gpu_bundle/MANIFEST.json   what is inside, the sizes, and what was left out and why

The pack itself travels as the working tree. benchmarks/gpu_device_run.sh is the command on the machine;
benchmarks/gpu_rehearse.sh runs that command here, on the CPU, from a copy of the bundle, without network.

    python3 tools/gpu_bundle.py                  # ComfyUI from the "newest" directory of .ci/comfyui-hosts
    python3 tools/gpu_bundle.py --comfyui DIR    # another checkout of the same commit
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Iterable, Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE_DIR = os.path.join(REPO, ".gpu_bundle")
HOSTS_FILE = os.path.join(REPO, ".ci", "comfyui-hosts")
CARRY_LIMIT = 64 * 1024 * 1024  # what one device call carries: working tree plus carried paths
log = logging.getLogger("perres.gpu_bundle")

# The lent machine's Python packages (device tool, KINDS.md, "Python packages already there", read
# 2026-11-17). Only names are listed there; versions where KINDS.md's pip-list row gives them.
DEVICE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())
DEVICE_VERSIONS = {"torch": "2.11.0", "torchvision": "0.26.0", "torchaudio": "2.11.0", "numpy": "2.5.2",
                   "safetensors": "0.8.0", "transformers": "5.17.0", "tokenizers": "0.23.2",
                   "sentencepiece": "0.2.2", "huggingface-hub": "1.33.0", "triton": "3.6.0"}

# What the bundle carries: ComfyUI 0.33.0's requirements that DEVICE_PACKAGES lacks, and what they need,
# at the versions the tests' 0.33.0 host runs (its .venv, made by .ci/provision-comfyui).
CARRIED_WHEELS = {
    "comfy-aimdo": "0.4.13",        # dynamic VRAM; comfy/memory_management.py imports it unconditionally
    "comfy-kitchen": "0.2.31",      # fused kernels; comfy/ldm/modules/attention.py imports it unconditionally
    "av": "18.1.0",                 # comfy_api.latest (imported by nodes.py) imports it for video types
    "torchsde": "0.2.6", "trampoline": "0.1.2",   # k-diffusion's SDE samplers
    "alembic": "1.20.1", "mako": "1.4.3", "sqlalchemy": "2.1.9", "greenlet": "3.5.6",  # the asset database
    "simpleeval": "1.0.8", "blake3": "1.0.11",
    "pydantic": "2.14.4", "pydantic-core": "2.50.5", "annotated-types": "0.8.0", "typing-inspection": "0.4.5",
    "pydantic-settings": "2.16.3", "python-dotenv": "1.2.4",
    # pydantic 2.14 needs typing-extensions >= 4.16; KINDS.md does not say which one the machine has.
    "typing-extensions": "4.16.0",
    "spandrel": "0.4.2", "kornia": "0.9.0", "kornia-rs": "0.2.0",  # "non essential": upscalers, morphology
}

# Requirements of ComfyUI left out on purpose. gpu_check runs ComfyUI in-process (no web server, no UI).
LEFT_OUT = {
    "comfyui-frontend-package": "the web UI (22 MB); gpu_check runs ComfyUI in-process and serves no pages",
    "comfyui-workflow-templates": "the UI's template gallery (seven media packages); not used in-process",
    "comfyui-embedded-docs": "the UI's node documentation (17 MB); not used in-process",
    "pyopengl": "only the GLSL shader node (comfy_extras/nodes_glsl.py), which needs a display; "
                "ComfyUI logs that node's import failure and goes on",
    "comfy-angle": "OpenGL ES for the GLSL shader node only, as pyopengl",
}

# Files dropped from carried wheels: (wheel name, path inside the wheel, why).
DROPPED_FILES = [
    ("comfy-kitchen", "comfy_kitchen/backends/hip/_C.abi3.so",
     "the AMD (ROCm) kernels, 59 MB; comfy_kitchen imports its hip backend only under a ROCm build of torch"),
]

# ComfyUI's files that a user's install has but a benchmark run needs not (and their size).
COMFYUI_EXCLUDES = (".git", ".venv", "venv", "__pycache__", "models", "user", "input", "output", "temp",
                    "custom_nodes", "tests", "tests-unit", ".github")
KEEP_EMPTY = ("models", "custom_nodes", "input", "output")  # folders ComfyUI expects; created empty

PLATFORMS = ("manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux2010_x86_64", "manylinux_2_12_x86_64", "manylinux1_x86_64")


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements_txt: str) -> list[str]:
    """Distribution names of a requirements.txt (comments, blank lines and options skipped)."""
    names = []
    for line in requirements_txt.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        names.append(canonical(re.split(r"[\s<>=!~;\[(]", line, maxsplit=1)[0]))
    return names


def unplaced_requirements(requirements_txt: str) -> list[str]:
    """Requirements that are neither on the machine, nor carried, nor left out on purpose (should be none)."""
    return [name for name in requirement_names(requirements_txt)
            if name not in DEVICE_PACKAGES and name not in CARRIED_WHEELS and name not in LEFT_OUT]


def device_side_requirements(requirements_txt: str) -> list[str]:
    """The requirements the GPU machine itself meets, as pip specifiers (pinned where DEVICE_VERSIONS knows
    the machine's version): what the rehearsal's fresh venv installs to stand in for the machine."""
    names = [name for name in requirement_names(requirements_txt) if name in DEVICE_PACKAGES]
    names += [name for name in ("torch", "torchvision", "torchaudio") if name not in names]
    return [f"{name}=={DEVICE_VERSIONS[name]}" if name in DEVICE_VERSIONS else name for name in names]


def pinned_host(name: str = "newest") -> tuple[str, str, str]:
    """(version, commit, directory) of a host row of .ci/comfyui-hosts."""
    with open(HOSTS_FILE, encoding="utf-8") as handle:
        for line in handle:
            fields = line.split("#", 1)[0].split()
            if len(fields) >= 4 and fields[0] == name:
                return fields[1], fields[2], os.path.expanduser(fields[3])
    raise SystemExit(f"{HOSTS_FILE} has no '{name}' host row")


def comfyui_files(root: str, commit: str) -> Iterator[tuple[str, bytes, int]]:
    """(relative path, content, mode) of the ComfyUI source: `git archive` of the commit when `root` is a git
    checkout, else the tree as it is (an extracted snapshot), minus COMFYUI_EXCLUDES."""
    if os.path.isdir(os.path.join(root, ".git")):
        archive = subprocess.run(["git", "-C", root, "archive", "--format=tar", commit], check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            for member in tar.getmembers():
                if member.isfile() and not excluded(member.name):
                    yield member.name, tar.extractfile(member).read(), member.mode
        return
    for folder, dirs, files in os.walk(root):
        rel_folder = os.path.relpath(folder, root)
        dirs[:] = sorted(d for d in dirs if not excluded(os.path.normpath(os.path.join(rel_folder, d))))
        for name in sorted(files):
            rel = os.path.normpath(os.path.join(rel_folder, name))
            path = os.path.join(folder, name)
            if excluded(rel) or name.endswith((".pyc", ".log")) or not os.path.isfile(path) or os.path.islink(path):
                continue
            with open(path, "rb") as handle:
                yield rel, handle.read(), os.stat(path).st_mode & 0o777


def excluded(relative: str) -> bool:
    parts = relative.replace("\\", "/").split("/")
    return parts[0] in COMFYUI_EXCLUDES or "__pycache__" in parts


def check_comfyui(root: str, version: str) -> None:
    version_file = os.path.join(root, "comfyui_version.py")
    if not os.path.isfile(version_file):
        raise SystemExit(f"{root} is not a ComfyUI checkout (no comfyui_version.py); pass --comfyui DIR, or make "
                         f"the pinned host with: .ci/provision-comfyui clone {root} COMMIT")
    text = open(version_file, encoding="utf-8").read()
    found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    if not found or found.group(1) != version:
        raise SystemExit(f"{root} is ComfyUI {found.group(1) if found else '?'}, but the bundle pins {version} "
                         f"(.ci/comfyui-hosts); pass --comfyui with a checkout of that version")


def download_wheels(dest: str) -> list[str]:
    """pip download of CARRIED_WHEELS for CPython 3.12 manylinux x86-64, without dependencies; paths."""
    specs = [f"{name}=={version}" for name, version in sorted(CARRIED_WHEELS.items())]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", dest]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    log.info("downloading %d wheels for CPython 3.12 manylinux x86-64 ...", len(specs))
    subprocess.run(command + specs, check=True)
    wheels = sorted(os.path.join(dest, f) for f in os.listdir(dest) if f.endswith(".whl"))
    found = {wheel_name(path) for path in wheels}
    missing = set(CARRIED_WHEELS) - found
    if missing:
        raise SystemExit(f"pip downloaded no wheel for {sorted(missing)}")
    return wheels


def wheel_name(path: str) -> str:
    return canonical(os.path.basename(path).split("-", 1)[0])


def wheel_requirements(path: str) -> list[str]:
    """Names a wheel requires on CPython 3.12 Linux (Requires-Dist without extras, markers evaluated)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement
    environment = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                   "os_name": "posix", "extra": ""}
    with zipfile.ZipFile(path) as wheel:
        metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        lines = wheel.read(metadata).decode("utf-8").splitlines()
    names = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            if requirement.marker is None or requirement.marker.evaluate(environment):
                names.append(canonical(requirement.name))
    return names


def check_closure(wheels: Iterable[str]) -> None:
    """Every carried wheel's requirements are on the machine or carried too (pip installs them --no-deps)."""
    missing = {}
    for path in wheels:
        for name in wheel_requirements(path):
            if name not in DEVICE_PACKAGES and name not in CARRIED_WHEELS:
                missing.setdefault(name, []).append(wheel_name(path))
    if missing:
        raise SystemExit("carried wheels need packages the GPU machine lacks; add them to CARRIED_WHEELS: "
                         + ", ".join(f"{name} (for {', '.join(by)})" for name, by in sorted(missing.items())))


def restored_wheel(path: str) -> tuple[bytes, list[str]]:
    """The wheel re-zipped without compression (xz compresses the whole bundle far better than zip's deflate),
    minus DROPPED_FILES; returns (bytes, dropped paths). RECORD loses the dropped lines."""
    drop = {inner for name, inner, _ in DROPPED_FILES if name == wheel_name(path)}
    out = io.BytesIO()
    dropped = []
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            if info.filename in drop:
                dropped.append(info.filename)
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode("utf-8").splitlines(keepends=True)
                               if line.split(",", 1)[0] not in drop).encode("utf-8")
            clone = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            clone.external_attr = info.external_attr
            target.writestr(clone, data, compress_type=zipfile.ZIP_STORED)
    missing = drop - set(dropped)
    if missing:
        raise SystemExit(f"{os.path.basename(path)} has no {sorted(missing)}: update DROPPED_FILES")
    return out.getvalue(), dropped


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def add_folder(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
    tar.addfile(info)


def working_tree_bytes() -> int:
    """Size of what travels besides the bundle: the tracked and untracked-not-ignored files of the checkout."""
    listed = subprocess.run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.split(b"\0")
    total = 0
    for rel in filter(None, listed):
        path = os.path.join(REPO, rel.decode("utf-8"))
        if os.path.isfile(path) and not os.path.islink(path):
            total += os.path.getsize(path)
    return total


def build(comfy_root: str, version: str, commit: str) -> dict:
    check_comfyui(comfy_root, version)
    requirements = open(os.path.join(comfy_root, "requirements.txt"), encoding="utf-8").read()
    unplaced = unplaced_requirements(requirements)
    if unplaced:
        raise SystemExit(f"ComfyUI {version} requires {unplaced}, which the GPU machine lacks and the bundle "
                         f"neither carries nor leaves out on purpose: add them to CARRIED_WHEELS or LEFT_OUT")
    os.makedirs(BUNDLE_DIR, exist_ok=True)
    manifest = {"comfyui": {"version": version, "commit": commit, "source": comfy_root,
                            "excluded": list(COMFYUI_EXCLUDES)},
                "wheels": {}, "left_out": LEFT_OUT,
                "dropped_files": [{"wheel": w, "path": p, "why": why} for w, p, why in DROPPED_FILES],
                "device_packages_used": sorted(set(requirement_names(requirements)) & DEVICE_PACKAGES)}
    with tempfile.TemporaryDirectory(prefix="perres-bundle-") as scratch:
        wheels = download_wheels(scratch)
        check_closure(wheels)
        partial = os.path.join(BUNDLE_DIR, "bundle.tar.xz.partial")
        log.info("writing %s (xz -9: a few minutes) ...", partial)
        with tarfile.open(partial, "w:xz", preset=9) as tar:
            add_folder(tar, "ComfyUI")
            files = 0
            for rel, data, mode in comfyui_files(comfy_root, commit):
                add_bytes(tar, f"ComfyUI/{rel}", data, mode)
                files += 1
            for folder in KEEP_EMPTY:
                add_folder(tar, f"ComfyUI/{folder}")
            manifest["comfyui"]["files"] = files
            add_folder(tar, "wheels")
            for path in wheels:
                data, dropped = restored_wheel(path)
                add_bytes(tar, f"wheels/{os.path.basename(path)}", data)
                manifest["wheels"][os.path.basename(path)] = {"bytes": len(data), "dropped": dropped}
        os.replace(partial, os.path.join(BUNDLE_DIR, "bundle.tar.xz"))
    bundle_bytes = os.path.getsize(os.path.join(BUNDLE_DIR, "bundle.tar.xz"))
    tree_bytes = working_tree_bytes()
    manifest["bytes"] = {"bundle": bundle_bytes, "working_tree": tree_bytes, "limit": CARRY_LIMIT}
    with open(os.path.join(BUNDLE_DIR, "MANIFEST.json.partial"), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2)
    os.replace(os.path.join(BUNDLE_DIR, "MANIFEST.json.partial"), os.path.join(BUNDLE_DIR, "MANIFEST.json"))
    total = bundle_bytes + tree_bytes
    log.info("bundle %.1f MiB + working tree %.1f MiB = %.1f MiB of the %d MiB a device call carries",
             bundle_bytes / 2 ** 20, tree_bytes / 2 ** 20, total / 2 ** 20, CARRY_LIMIT // 2 ** 20)
    if total > CARRY_LIMIT:
        raise SystemExit(f"the bundle and the working tree come to {total / 2 ** 20:.1f} MiB, over the "
                         f"{CARRY_LIMIT // 2 ** 20} MiB a device call carries: leave more out")
    return manifest


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", help="ComfyUI checkout of the pinned version (default: .ci/comfyui-hosts)")
    parser.add_argument("--device-side-requirements", action="store_true",
                        help="print what the machine has of ComfyUI's requirements (for the rehearsal venv) and stop")
    opts = parser.parse_args(argv)
    version, commit, directory = pinned_host("newest")
    if opts.device_side_requirements:
        root = os.path.abspath(os.path.expanduser(opts.comfyui or directory))
        with open(os.path.join(root, "requirements.txt"), encoding="utf-8") as handle:
            sys.stdout.write("\n".join(device_side_requirements(handle.read())) + "\n")
        return
    build(os.path.abspath(os.path.expanduser(opts.comfyui or directory)), version, commit)
    log.info("done: carry .gpu_bundle in a device call; run there: bash benchmarks/gpu_device_run.sh")


if __name__ == "__main__":
    main()
