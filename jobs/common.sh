# Sourced by the job scripts (jobs/slurm/*.sbatch, jobs/local/train.sh); not run on its own:
#   REPO_DIR=/path/to/checkout; source "$REPO_DIR/jobs/common.sh"; jobs_init
# shellcheck shell=bash
#
# Cluster specifics come from the environment and the one env file (jobs/cluster.env, or the file
# CLUSTER_ENV names; copy jobs/cluster.env.example). Variables already in the environment win over
# the file, so `NNODES=4 jobs/submit ...` or `sbatch --export=ALL,...` override it per job.

# Source the env file with `set -a`, then restore what the environment already exported.
load_cluster_env() {
    local file=${CLUSTER_ENV:-$REPO_DIR/jobs/cluster.env}
    if [[ ! -e $file ]]; then
        if [[ -n ${CLUSTER_ENV:-} ]]; then
            echo "error: CLUSTER_ENV=$CLUSTER_ENV: env file not found" >&2
            exit 2
        fi
        return 0
    fi
    local saved
    saved=$(export -p)
    set -a
    # shellcheck source=/dev/null
    source "$file"
    set +a
    eval "$saved"
}

# Environment modules, then the Python environment whose torchrun/ray/python the jobs use.
activate_python() {
    if [[ -n ${MODULES:-} ]]; then
        if ! command -v module >/dev/null 2>&1; then
            echo "error: MODULES='$MODULES' is set but this node has no 'module' command" >&2
            exit 2
        fi
        # shellcheck disable=SC2086  # a list of module names
        module load $MODULES
    fi
    local venv=${VENV:-$REPO_DIR/.venv}
    if [[ -z ${PYTHON:-} ]]; then
        if [[ -x $venv/bin/python ]]; then
            PYTHON=$venv/bin/python
        else
            PYTHON=$(command -v python3 || true)
        fi
    fi
    if [[ -z $PYTHON || ! -x $PYTHON ]]; then
        echo "error: no Python found (VENV=$venv, PYTHON=${PYTHON:-unset}); set VENV in the env file" >&2
        exit 2
    fi
    # torchrun and ray come from the same environment as python.
    PATH="$(dirname "$PYTHON"):$PATH"
    export PATH PYTHON
    export NO_ALBUMENTATIONS_UPDATE=1
}

jobs_init() {
    load_cluster_env
    activate_python
    cd "$REPO_DIR" || exit 2
}

# Pre-flight checks (jobs/preflight.py); prints one `error: ...` line and exits 2 on bad input.
preflight() {
    "$PYTHON" "$REPO_DIR/jobs/preflight.py" "$@" || exit 2
}

# GPUs this node offers the job: SLURM's count, else nvidia-smi's, else 1 (one CPU worker).
gpus_on_node() {
    local n=${SLURM_GPUS_ON_NODE:-}
    if [[ -z $n ]] && command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if [[ -z $n || $n == 0 ]]; then
        n=1
    fi
    echo "$n"
}

# Experiment overrides every launcher adds: data and run roots from the env file, resume=auto.
# Usage: mapfile -t extra < <(common_overrides CONFIG)
common_overrides() {
    local config=$1
    if [[ -n ${DATA_ROOT:-} ]]; then
        echo "data.root=$DATA_ROOT"
    fi
    if [[ -n ${RUN_DIR:-} ]]; then
        echo "run.dir=$RUN_DIR"
    elif [[ -n ${RUNS_ROOT:-} ]]; then
        local name
        name=$(basename "$config")
        echo "run.dir=$RUNS_ROOT/${RUN_NAME:-${name%.*}}"
    fi
    # A restarted or requeued job continues from run.dir/checkpoints/last.pt.
    echo "train.resume=${RESUME:-auto}"
}

# Address of a node of this job: SLURM's NodeAddr for it (the node name itself on most clusters).
node_address() {
    local addr
    addr=$(scontrol show node "$1" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    echo "${addr:-$1}"
}
