#!/bin/bash
# jobs/local/train.sh configs/cub/st2_448.yaml [section.key=value ...]      (from anywhere)
#   NGPU=2 jobs/local/train.sh ...   CPU: NGPU=2 jobs/local/train.sh configs/demo.yaml train.device=cpu
#
# One machine, no scheduler: `torchrun --standalone` with one worker per GPU (NGPU, default: all
# GPUs, else 1 CPU worker), taking the same arguments and env file as jobs/slurm/train.sbatch
# (DATA_ROOT, RUN_DIR / RUNS_ROOT, train.resume=auto). SIGTERM makes the ranks write a checkpoint
# before they stop (Ctrl-C just stops them); running the same command again resumes.
set -euo pipefail

REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# shellcheck source=jobs/common.sh
source "$REPO_DIR/jobs/common.sh"
jobs_init

CONFIG=${1:-${CONFIG:-}}
if (($#)); then shift; fi
mapfile -t extra < <(common_overrides "${CONFIG:-config}")
overrides=("${extra[@]}" "$@")
NGPU=${NGPU:-$(gpus_on_node)}

preflight train "$CONFIG" "${overrides[@]}" --world-size "$NGPU"
echo "[$(date -Is)] local run: $NGPU worker(s), config $CONFIG"
# exec: torchrun gets our signals directly and forwards SIGTERM/SIGINT to its workers.
exec torchrun --standalone --nnodes 1 --nproc_per_node "$NGPU" \
    -m pipeline.train --config "$CONFIG" "${overrides[@]}"
