#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one call, under 7 minutes on one H100/H200 with 16 cores:
#   mkdir -p ext && cp PATH/TO/plain_nxst.py ext/   # an outside plain reference, if you have one (ext/ is git-ignored)
#   OUT=$OUT bash benchmarks/gpu_all.sh                       # on the GPU machine; carry .whl and ext
#   DRY=1 PY=.venv/bin/python OUT=/tmp/gpu_dry bash benchmarks/gpu_all.sh   # the whole flow on CPU, tiny sizes
# .whl/ (git-ignored) holds the py3.12 manylinux wheels that the GPU machine lacks (omegaconf, webdataset,
# albumentations, pydantic, ...): docs/benchmarks.md says how to build it. They are installed into a
# folder on PYTHONPATH, with the repository root (no `pip install -e` there).
# Steps, each under its own timeout (cut to what is left of the DEADLINE), a failure logged and the next run:
#   1. plain PyTorch N x ST-CNN reference, eager (ext/plain_nxst.py, COMPILE=0)       -> plain_nxst.json
#   2. the trainer's step vs N+1 backbone passes, eager, N = 2 and 4, loop and vmap   -> bench_train_step_cuda.json
#   3. spatial-transformer fast paths (bench_st_core.py)                              -> bench_st_core.json
#   4. a real training run on synthetic CUB shards (made in the background meanwhile): the trainer's
#      own images/s and data-wait %                                                  -> train_metrics.jsonl
#   4b. data-prep throughput: data_prep cub (1, 2, 8 workers) vs reading the bytes  -> bench_data_prep.json
#   5. the trainer's step under torch.compile: compile time, ratio to N+1 compiled backbone passes
#                                                                                     -> bench_train_step_compiled.json
#   6. the loader benchmark, if time is left (real CUB JPEGs from ext/cub_jpegs if there) -> bench_loader.json
# Everything printed also goes to $OUT/gpu_all.log.
set -euo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PY:-python3}
B=${B:-128}
DRY=${DRY:-0}
DEADLINE=${DEADLINE:-390}   # seconds from the start; the device's limit is 7 minutes for the whole call
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_all.XXXXXX")
exec > >(tee -a "$OUT/gpu_all.log") 2>&1
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1

# timeout for a step: at most $1 seconds, and no later than DEADLINE minus $2 seconds kept for later steps
cap() {
    local want=$1 left=$((DEADLINE - SECONDS - ${2:-0}))
    ((left < want)) && want=$left
    ((want < 1)) && want=1
    echo "$want"
}
# step NAME SECONDS CMD...: run CMD under timeout; log its outcome, never stop the script
step() {
    local name=$1 limit=$2
    shift 2
    echo "== [${SECONDS}s] $name (timeout ${limit}s)"
    if timeout -k 10 "$limit" "$@"; then
        echo "== [${SECONDS}s] $name done"
    else
        echo "== [${SECONDS}s] $name FAILED or timed out (exit $?)"
    fi
}

if [[ $DRY == 1 ]]; then  # tiny sizes on CPU: checks the flow, not the figures
    DEV=cpu
    PLAIN_ENV=(B=2 BACKBONE=resnet10t COMPILE=0)
    TS=(--device cpu --backbone resnet10t --input-size 64 --crop-size 32 --batch 4)
    TS_EAGER=(--streams 2 --stream-mode loop vmap --steps 1 --rounds 1 --warmup 1)
    TS_COMPILED=(--streams 2 --steps 1 --rounds 1 --warmup 2 --memory none)
    ST=(--device cpu --backbone resnet10t --batch 2 --input-size 64 --crop-size 32 --num-streams 2
        --warmup 1 --repeats 1)
    SYN=(--classes 4 --images-per-class 8 --size 96 --test-fraction 0.25)
    PREP_WORKERS=2
    TRAIN=(model.backbone=resnet10t model.input_size=64 model.crop_size=32 train.max_steps=4
           train.global_batch_size=8 train.num_workers=2 train.log_every=2 train.eval_max_samples=8
           train.device=cpu train.precision=fp32)
    LOADER=(--images 64 --per-round 32 --rounds 1 --batch 8 --input-size 224 --resize 256)
    PREP_IMAGES=200
else
    DEV=cuda
    PLAIN_ENV=(B="$B" COMPILE=0)
    TS=(--device cuda --batch "$B")
    TS_EAGER=(--streams 2 4 --stream-mode loop vmap --steps 5 --rounds 3 --warmup 3)
    TS_COMPILED=(--streams 2 --steps 5 --rounds 3 --warmup 3)
    ST=(--device cuda --batch "$B" --warmup 2 --repeats 5)
    # ~500 px JPEGs like CUB's (which are about 500 x 375): the loader's decode cost, not its image count,
    # sets the data-wait, and the training stream resamples the shards forever.
    SYN=(--classes 10 --images-per-class 40 --size 500 --test-fraction 0.25)
    PREP_WORKERS=8
    TRAIN=(train.max_steps=200 train.global_batch_size="$B" train.num_workers=12 train.log_every=20
           train.eval_max_samples=128)
    LOADER=(--images 256 --per-round 256 --rounds 2)
    PREP_IMAGES=11788  # all of CUB
fi

echo "== gpu_all.sh $(date -u '+%Y-%m-%d %H:%M UTC') DRY=$DRY DEADLINE=${DEADLINE}s OUT=$OUT"

# ---- 0. carried wheels -> $WORK/site, and the repository root, on PYTHONPATH
SITE=$WORK/site
if compgen -G ".whl/*.whl" > /dev/null; then
    PIP_TARGET=()
    # Here (DRY) the interpreter is not the GPU machine's py3.12: check that the set installs, keep it off the path.
    [[ $DRY == 1 ]] && PIP_TARGET=(--python-version 3.12 --implementation cp --only-binary=:all:
                                   --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${PIP_TARGET[@]}" .whl/*.whl
    echo "installed $(find .whl -name '*.whl' | wc -l) carried wheels into $SITE"
    [[ $DRY == 1 ]] || export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
[[ ${PYTHONPATH:-} == *"$PWD"* ]] || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "PYTHONPATH=$PYTHONPATH"
"$PY" - "$DEV" << 'EOF' || echo "import check FAILED"
import sys, time
t = time.perf_counter()
import torch, timm, numpy, cv2, yaml, omegaconf, webdataset, albumentations, pydantic
import pipeline.train, pipeline.data, data_prep
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), timm {timm.__version__}, "
      f"numpy {numpy.__version__}, opencv {cv2.__version__}, omegaconf {omegaconf.__version__}, "
      f"albumentations {albumentations.__version__}, pydantic {pydantic.__version__}; imports {time.perf_counter() - t:.1f}s")
if sys.argv[1] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device"
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, {torch.get_num_threads()} threads")
EOF
if command -v nvidia-smi > /dev/null; then nvidia-smi || true; fi
echo "cpus: $(nproc)"

# ---- data for step 4, made in the background while the GPU benchmarks run (1-2 of the 16 cores)
RAW=$WORK/synthetic_cub
SHARDS=$WORK/cub_shards
(timeout 150 "$PY" -m data_prep synthetic-cub --out "$RAW" "${SYN[@]}" &&
    timeout 60 "$PY" -m data_prep cub --root "$RAW" --out "$SHARDS" --workers "$PREP_WORKERS") \
    > "$WORK/data_prep.log" 2>&1 &
DATA_PID=$!

# ---- 1. the plain reference
if [[ -f ext/plain_nxst.py ]]; then
    step "1. plain reference ext/plain_nxst.py (${PLAIN_ENV[*]})" "$(cap 90 240)" \
        env "${PLAIN_ENV[@]}" OUT="$OUT" "$PY" ext/plain_nxst.py
else
    echo "== 1. ext/plain_nxst.py missing: step 1 (the outside plain reference) skipped"
fi

# ---- 2. the trainer's step, eager
step "2. bench_train_step eager" "$(cap 120 220)" \
    "$PY" benchmarks/bench_train_step.py "${TS[@]}" "${TS_EAGER[@]}" --json "$OUT/bench_train_step_$DEV.json"

# ---- 3. spatial-transformer fast paths
step "3. bench_st_core" "$(cap 90 200)" "$PY" benchmarks/bench_st_core.py "${ST[@]}" --json "$OUT/bench_st_core.json"

# ---- 4. a real training run: the trainer's images/s and data-wait
if wait "$DATA_PID"; then
    echo "== [${SECONDS}s] data prep done"
else
    echo "== [${SECONDS}s] data prep FAILED (exit $?)"
fi
tail -n 5 "$WORK/data_prep.log"
if [[ -f $SHARDS/manifest.json ]]; then
    step "4. training run (configs/cub/st2_448.yaml, synthetic CUB)" "$(cap 120 180)" \
        "$PY" -m pipeline.train --config configs/cub/st2_448.yaml data.root="$SHARDS" run.dir="$WORK/run" \
        model.pretrained=null optim.lr=0.01 train.eval_every=100000 train.checkpoint_every=100000 train.num_viz=0 "${TRAIN[@]}"
    if [[ -f $WORK/run/metrics.jsonl ]]; then
        cp "$WORK/run/metrics.jsonl" "$OUT/train_metrics.jsonl"
        "$PY" - "$WORK/run/metrics.jsonl" << 'EOF' || echo "metrics summary FAILED"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
setup = next((r for r in rows if r["split"] == "setup"), {})
train = [r for r in rows if r["split"] == "train"]
for r in train:
    print(f"step {r['step']:5d}  {r['images_per_s']:8.1f} img/s  data-wait {r['data_wait_pct']:5.1f} %  loss {r['loss']:.3f}")
steady = train[1:] or train  # the first window includes starting the loader workers
mean = lambda key: sum(r[key] for r in steady) / max(len(steady), 1)
print("TRAIN SUMMARY " + json.dumps({"device": setup.get("device"), "precision": setup.get("precision"),
      "global_batch": setup.get("global_batch_size"), "log_windows": len(train), "steady_windows": len(steady),
      "steady_images_per_s": round(mean("images_per_s"), 1), "steady_data_wait_pct": round(mean("data_wait_pct"), 2),
      "max_data_wait_pct_after_first": round(max((r["data_wait_pct"] for r in steady), default=0), 2),
      "first_window_data_wait_pct": train[0]["data_wait_pct"] if train else None}))
EOF
    fi
else
    echo "== 4. skipped: no shards ($SHARDS/manifest.json missing)"
fi

# ---- 4b. data-prep throughput on this machine's cores (CPU only; nothing else runs meanwhile):
# `data_prep cub` with 1, 2 and 8 workers against reading the same bytes, page cache warm and cold
# (cold needs root for drop_caches; the benchmark measures warm alone where it is refused)
PREP_BENCH=(benchmarks/bench_data_prep.py --images "$PREP_IMAGES" --workers 1 2 8 --repeats 3 --skip-full
            --workdir "$WORK/prep_bench" --json "$OUT/bench_data_prep.json")
compgen -G "ext/cub_jpegs/*.jpg" > /dev/null && PREP_BENCH+=(--jpeg-dir ext/cub_jpegs)
step "4b. bench_data_prep" "$(cap 100 120)" "$PY" "${PREP_BENCH[@]}" --cache warm cold

# ---- 5. the trainer's step under torch.compile (last of the required steps: it gets what time is left)
if ((DEADLINE - SECONDS > 60)); then
    step "5. bench_train_step compiled" "$(cap 240 0)" "$PY" benchmarks/bench_train_step.py "${TS[@]}" \
        --compile "${TS_COMPILED[@]}" --json "$OUT/bench_train_step_compiled.json"
else
    echo "== 5. skipped: $((DEADLINE - SECONDS))s left"
fi

# ---- 6. loader benchmark, only with time to spare
if ((DEADLINE - SECONDS > 40)); then
    # real CUB JPEGs where a folder of them was carried in ext/ (git-ignored), else generated ones
    compgen -G "ext/cub_jpegs/*.jpg" > /dev/null && LOADER+=(--jpeg-dir ext/cub_jpegs)
    step "6. bench_loader" "$(cap 60 0)" "$PY" benchmarks/bench_loader.py "${LOADER[@]}" \
        --work-dir "$WORK" --out "$OUT/bench_loader.json"
else
    echo "== 6. bench_loader skipped: $((DEADLINE - SECONDS))s left"
fi

echo "== [${SECONDS}s] finished; files in $OUT:"
ls -l "$OUT"
rm -rf "$WORK"
