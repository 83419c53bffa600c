#!/usr/bin/env bash
# The one command on a lent GPU machine: ComfyUI and its missing wheels from .gpu_bundle/ (made here by
# tools/gpu_bundle.py), the pack from the working tree, then benchmarks/gpu_check.py, twice:
#
#   pass "dyn_on"   SD1.5 (512 px, 150 steps) and SDXL (1024 px, $SDXL_TRAIN_STEPS steps) with ComfyUI's
#                   dynamic VRAM (comfy-aimdo), what ComfyUI 0.33.0 runs on NVIDIA by default
#   pass "dyn_off"  SD1.5 again with the classic ModelPatcher (50 training steps, no TrainLoraNode), in the
#                   time held back for it
#
# Everything lands in $OUT (default ./gpu_out): setup.log, gpu_check_<pass>.json and <pass>.log for each
# pass, summary.txt. Each pass has a deadline and a hard timeout taken from the remaining budget
# ($BUDGET_S seconds for the whole script, 470 by default: inside the 8 minutes of one call), and its
# JSON is rewritten after every phase, so a pass cut short still reports what it measured.
#
#   bash benchmarks/gpu_device_run.sh            # on the device: run tool, carry [".gpu_bundle"]
#   bash benchmarks/gpu_device_run.sh --smoke    # the second, short try: every phase at 64 px, 2 steps
#
# PYTHON (default python3) is the interpreter that has torch; PERRES_DEVICE (default cuda) is cpu for the
# rehearsal (benchmarks/gpu_rehearse.sh); FAMILIES (default sd15,sdxl) are the first pass's families;
# SKIP_STOCK_FAMILIES (default none) run there without TrainLoraNode. FAMILIES=anima,krea2 is the DiT call
# instead: one pass, DIT_TRAIN_STEPS (10) steps each, no TrainLoraNode on Krea 2 unless SKIP_STOCK_FAMILIES says.
set -uo pipefail

SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
PACK="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
DEVICE="${PERRES_DEVICE:-cuda}"
BUDGET_S="${BUDGET_S:-470}"
SDXL_TRAIN_STEPS="${SDXL_TRAIN_STEPS:-20}"
DIT_TRAIN_STEPS="${DIT_TRAIN_STEPS:-10}"
FAMILIES="${FAMILIES:-sd15,sdxl}"
OUT="${OUT:-$PACK/gpu_out}"
BUNDLE="${GPU_BUNDLE:-$PACK/.gpu_bundle}/bundle.tar.xz"
START=$(date +%s)
mkdir -p "$OUT"
SETUP_LOG="$OUT/setup.log"

say() { echo "[gpu_device_run $(( $(date +%s) - START ))s] $*" | tee -a "$SETUP_LOG"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

if [ ! -f "$BUNDLE" ]; then
  say "no $BUNDLE: run 'python3 tools/gpu_bundle.py' in the checkout first and carry .gpu_bundle"
  exit 2
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/perres-gpu.XXXXXX")"
say "work folder $WORK; python $PYTHON; device $DEVICE; budget ${BUDGET_S}s; smoke $SMOKE"
tar -xJf "$BUNDLE" -C "$WORK" || { say "could not extract $BUNDLE"; exit 2; }
say "extracted the bundle"

# ComfyUI's missing requirements into a site folder of their own; the machine's packages stay as they are.
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
  "$WORK"/wheels/*.whl >>"$SETUP_LOG" 2>&1 || { say "pip could not install the carried wheels (see setup.log)"; exit 2; }
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
say "installed $(ls "$WORK"/wheels/*.whl | wc -l) wheels into $WORK/site"

# The pack where a user's install has it, so the benchmarks find the enclosing ComfyUI by themselves.
TARGET="$WORK/ComfyUI/custom_nodes/PerRes"
mkdir -p "$TARGET"
tar -C "$PACK" --exclude=./.git --exclude=./.gpu_bundle --exclude=./gpu_out --exclude=./.whl \
  --exclude=./bench_out --exclude='*/__pycache__' -cf - . | tar -C "$TARGET" -xf -
unset COMFYUI_PATH
export PERRES_TEST_CACHE="${PERRES_TEST_CACHE:-$WORK/cache}"
{
  echo "--- versions"
  "$PYTHON" - <<'EOF'
import importlib.metadata as md, platform, sys
print("python", sys.version.split()[0], platform.machine())
for name in ("torch", "torchvision", "numpy", "safetensors", "transformers", "tokenizers", "comfy-aimdo",
             "comfy-kitchen", "av", "pydantic", "typing-extensions", "einops", "aiohttp"):
    try:
        print(f"{name} {md.version(name)}  ({md.distribution(name).locate_file('')})")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
try:
    import torch
    print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
except Exception as error:
    print("torch failed:", error)
EOF
  echo "--- pip check (what the machine's packages and the carried wheels say of each other)"
  "$PYTHON" -m pip check 2>&1 | head -40
  echo "--- ComfyUI $(grep -o "__version__ = .*" "$WORK/ComfyUI/comfyui_version.py")"
} >>"$SETUP_LOG" 2>&1
say "setup done; $(left)s left for the checks"

run_pass() {  # run_pass NAME SECONDS_HELD_BACK_FOR_LATER ARGS...
  local name="$1" reserve="$2"; shift 2
  local budget=$(( $(left) - reserve ))
  if [ "$budget" -lt 60 ]; then
    say "pass $name: skipped, only ${budget}s left"
    echo "$name: skipped (out of time)" >>"$OUT/summary.txt"
    return
  fi
  # Phases may start until 80 % of the pass's time; the hard timeout ends one that overruns.
  local deadline=$(( budget * 4 / 5 ))
  say "pass $name: timeout ${budget}s, phases start until ${deadline}s"
  (cd "$TARGET" && timeout --kill-after=10 "$budget" "$PYTHON" benchmarks/gpu_check.py --device "$DEVICE" \
      --deadline "$deadline" --json "$OUT/gpu_check_$name.json" "$@") >"$OUT/$name.log" 2>&1
  local rc=$?
  say "pass $name: exit $rc"
  { echo "$name: exit $rc"; sed -n '/^=\{20,\}/,/^=\{20,\}/p' "$OUT/$name.log"; } >>"$OUT/summary.txt"
}

FIRST=(--sdxl-train-steps "$SDXL_TRAIN_STEPS" --sdxl-sample-repeats 1)
SECOND=(--train-steps 50 --sample-repeats 1 --skip-stock)
if [ "$SMOKE" = 1 ]; then FIRST=(--smoke); SECOND=(--smoke --skip-stock); fi
: >"$OUT/summary.txt"
case ",$FAMILIES," in
  *,anima,*|*,krea2,*)  # the DiTs: a call of their own, one pass (benchmarks/README.md, gpu_check.py)
    [ "$SMOKE" = 1 ] || FIRST=(--dit-train-steps "$DIT_TRAIN_STEPS" --dit-sample-repeats 1)
    run_pass dits 5 --families "$FAMILIES" --dynamic-vram on --skip-stock-families "${SKIP_STOCK_FAMILIES:-krea2}" \
      "${FIRST[@]}" ;;
  *)
    run_pass dyn_on 90 --families "$FAMILIES" --dynamic-vram on --skip-stock-families "${SKIP_STOCK_FAMILIES:-}" \
      "${FIRST[@]}"
    run_pass dyn_off 5 --families sd15 --dynamic-vram off "${SECOND[@]}" ;;
esac
say "done in $(( $(date +%s) - START ))s; results in $OUT"
cat "$OUT/summary.txt"
[ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
