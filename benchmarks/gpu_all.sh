#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one call (target: under 8 minutes on one H100/H200):
#   mkdir -p ext && cp ../shared/bench/plain_nxst.py ext/   # the plain reference; ext/ is git-ignored
#   OUT=gpu_results bash benchmarks/gpu_all.sh
# Runs, on the same card and in the same call, so ratios are comparable:
#   1. the plain PyTorch N x ST-CNN reference (ext/plain_nxst.py: backbone alone, N = 2 and 4, compiled backbone)
#   2. the project's N x ST-CNN train step against N+1 backbone passes (bench_train_step.py, inception_v3, 448, bf16)
#   3. the spatial-transformer fast paths: warp_many vs expanded copies, vmapped vs looped streams (bench_st_core.py)
# Each writes JSON under $OUT; the summary lines are printed as they come.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
PY=${PY:-python}
B=${B:-128}
mkdir -p "$OUT"
export NO_ALBUMENTATIONS_UPDATE=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)"

if [[ -f ext/plain_nxst.py ]]; then
    echo "== plain reference (batch $B)"
    B=$B OUT=$OUT timeout 240 "$PY" ext/plain_nxst.py | tail -n 40 || echo "plain reference failed or timed out"
else
    echo "ext/plain_nxst.py missing: copy ../shared/bench/plain_nxst.py there to measure the reference" >&2
fi

echo "== project N x ST-CNN train step vs N+1 backbone passes"
timeout 240 "$PY" benchmarks/bench_train_step.py --device cuda --batch "$B" --streams 2 4 \
    --json "$OUT/bench_train_step_cuda.json" || echo "bench_train_step failed or timed out"

echo "== spatial-transformer fast paths"
timeout 120 "$PY" benchmarks/bench_st_core.py --device cuda --batch "$B" --json "$OUT/bench_st_core.json" \
    || echo "bench_st_core failed or timed out"
ls -l "$OUT"
