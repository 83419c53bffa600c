#!/usr/bin/env bash
# Rehearse the lent GPU machine's run here, on the CPU, so that its first run is not the first run:
#
#   1. a fresh venv of the machine's Python (3.12) holding only what the machine has of ComfyUI's
#      requirements, at the machine's versions where the device tool's KINDS.md gives them
#      (tools/gpu_bundle.py --device-side-requirements; made once, from PyPI, kept in $VENV);
#   2. a temporary folder with a copy of .gpu_bundle/ and of the working tree as the run tool copies it
#      (tracked files and untracked files git does not ignore);
#   3. benchmarks/gpu_device_run.sh --smoke there, on the CPU, with no network (unshare -n), with only what
#      the bundle carries on top of that venv.
#
#   python3 tools/gpu_bundle.py && bash benchmarks/gpu_rehearse.sh
#
# Needs about 12 GB of memory and 10 GB of disk (it builds the random SD1.5 and SDXL checkpoints in its
# own cache unless PERRES_TEST_CACHE points at one); about 15 minutes on 2 cores. Results: $OUT
# (default /tmp/perres-rehearsal-out). FAMILIES=sd15 leaves out SDXL. TrainLoraNode on SDXL is left out
# (SKIP_STOCK_FAMILIES=sdxl; set it empty to try): with SDXL's fp16 weights on a CPU it took the process
# past 24 GiB and the OOM killer ended it, which the GPU machine's 128 GiB does not risk.
set -euo pipefail

PACK="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$HOME/.cache/perres-h200-venv}"
PY312="${PY312:-$(command -v python3.12 || ls -d "$HOME"/.pyenv/versions/3.12*/bin/python 2>/dev/null | tail -1)}"
OUT="${OUT:-/tmp/perres-rehearsal-out}"

[ -f "$PACK/.gpu_bundle/bundle.tar.xz" ] || { echo "no .gpu_bundle/: run python3 tools/gpu_bundle.py first" >&2; exit 2; }
if [ ! -x "$VENV/bin/python" ]; then
  [ -n "$PY312" ] || { echo "no Python 3.12 found: set PY312 to one (the GPU machine runs 3.12)" >&2; exit 2; }
  echo "making the stand-in venv $VENV from $PY312"
  "$PY312" -m venv "$VENV"
  # shellcheck disable=SC2046
  "$VENV/bin/python" -m pip install -q $(python3 "$PACK/tools/gpu_bundle.py" --device-side-requirements)
fi

STAGE="$(mktemp -d /tmp/perres-rehearsal.XXXXXX)"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/checkout/.gpu_bundle"
cp "$PACK/.gpu_bundle/bundle.tar.xz" "$STAGE/checkout/.gpu_bundle/"
(cd "$PACK" && git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$STAGE/checkout/")
rm -rf "$OUT" && mkdir -p "$OUT"
echo "rehearsing in $STAGE/checkout with $VENV/bin/python, no network; results in $OUT"
# Only the network is taken away: unshare -n gives the run a network namespace with a loopback alone.
unshare -n env -i HOME="$HOME" PATH="/usr/bin:/bin" TMPDIR="$STAGE" PYTHON="$VENV/bin/python" \
  PERRES_DEVICE=cpu FAMILIES="${FAMILIES:-sd15,sdxl}" SKIP_STOCK_FAMILIES="${SKIP_STOCK_FAMILIES-sdxl}" BUDGET_S="${BUDGET_S:-3600}" OUT="$OUT" ${PERRES_TEST_CACHE:+PERRES_TEST_CACHE="$PERRES_TEST_CACHE"} \
  bash "$STAGE/checkout/benchmarks/gpu_device_run.sh" --smoke
