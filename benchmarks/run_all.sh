#!/usr/bin/env bash
# Every benchmark on every tested host (.ci/comfyui-hosts), one after the other, at settings small enough
# for the 2-core development VM (about 27 minutes a host); logs in bench_out/<version>/<script>.log, each
# script's record in bench_out/<version>/<script>.json (docs/figures/README.md) and its summary block in
# bench_out/summary.txt. Run it on an otherwise idle machine: the ratios
# are measured within one run, but two benchmarks at once would share the cores.
#
#   bash benchmarks/run_all.sh                 # every host, every script
#   bash benchmarks/run_all.sh bench_training  # only the scripts named
#   VERSIONS=0.33.0 bash benchmarks/run_all.sh # only the hosts named (space-separated versions)
set -uo pipefail

PACK="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$PACK/bench_out"
declare -A ARGS=(
  [bench_training]=""
  [bench_lag]="--resolution 64"
  [bench_lag_lora]="--part speed --resolution 256"
  [bench_paper_scale]="--resolution 256 --steps 2"
  [bench_suggest]=""
  [bench_preview]=""
  [gpu_check]="--device cpu --smoke --families sd15"
)
ORDER=(bench_training bench_lag bench_lag_lora bench_paper_scale bench_suggest bench_preview gpu_check)
[ "$#" -gt 0 ] && ORDER=("$@")
mkdir -p "$OUT"
: >"$OUT/summary.txt"
while read -r name version commit directory _; do
  case "$name" in ''|\#*) continue ;; esac
  case " ${VERSIONS:-$version} " in *" $version "*) ;; *) continue ;; esac
  host="${directory/#\~/$HOME}"
  python="$host/.venv/bin/python"
  if [ ! -x "$python" ]; then
    echo "skipping ComfyUI $version: no $python (run .ci/run once to set the host up)" | tee -a "$OUT/summary.txt"
    continue
  fi
  mkdir -p "$OUT/$version"
  for script in "${ORDER[@]}"; do
    extra="${ARGS[$script]-}"
    [ "$script" = gpu_check ] && extra="$extra --json $OUT/$version/gpu_check.json"
    echo "== ComfyUI $version: $script $extra" | tee -a "$OUT/summary.txt"
    start=$(date +%s)
    # shellcheck disable=SC2086
    (cd "$PACK" && COMFYUI_PATH="$host" "$python" "benchmarks/$script.py" $extra) >"$OUT/$version/$script.log" 2>&1
    rc=$?
    sed -n '/^=\{40,\}/,/^=\{40,\}/p' "$OUT/$version/$script.log" >>"$OUT/summary.txt"
    echo "   exit $rc, $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
  done
done <"$PACK/.ci/comfyui-hosts"
echo "logs in $OUT; summaries in $OUT/summary.txt"
