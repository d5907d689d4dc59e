#!/usr/bin/env bash
# The whole GPU benchmark set in one go (under 8 minutes on an H100/H200), written to benchmarks/results/.
#   1. MedSAM2-sized: SAM 2.1 tiny at 512 px, 512x512x200
#   2. SAM 2.1 tiny at 1024 px, 512x512x200
# Each runs the engine (bf16, TF32, cached bf16 features, chunked host copies) against Meta's
# SAM2VideoPredictor under the same bf16 autocast and TF32, once as documented and once compiled
# (vos_optimized); bench_propagation.py prints both ratios. The behaving model (128 px, CPU-trained)
# gives local_vs_full_dice when it is cached; build it first with benchmarks/behaving_model.py.
#
#   bash benchmarks/gpu.sh            # from the repository root, on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/MedSAM2Slicer${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
PY="${PYTHON:-python}"
OUT=benchmarks/results
mkdir -p "$OUT"
STAMP=$(date -u +%Y%m%dT%H%MZ)
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
BEHAVING=()
CACHED="${MEDSAM2_BENCH_CACHE:-$HOME/.cache/medsam2-bench}/behaving/behaving.json"
if [ -f "$CACHED" ]; then
  BEHAVING=(--behaving "$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['model'])" "$CACHED")")
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_${STAMP}_machine.txt"
for size in 512 1024; do
  echo "== SAM 2.1 tiny at $size px, 512x512x200 on $GPU"
  timeout 230 "$PY" benchmarks/bench_propagation.py --device cuda --image-size "$size" --size 512 --slices 200 \
    "${BEHAVING[@]}" --json "$OUT/gpu_${STAMP}_${GPU}_tiny${size}.json" \
    | tee "$OUT/gpu_${STAMP}_${GPU}_tiny${size}.txt"
done
echo "written: $OUT/gpu_${STAMP}_*"
