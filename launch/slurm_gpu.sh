#!/usr/bin/env bash
# Train rdlm on GPU nodes under SLURM: writes a batch script and submits it with sbatch. srun starts one
# task per GPU; rdlm sees SLURM_NTASKS > 1 and jax.distributed.initialize() takes the coordinator, process
# count and id from SLURM's variables (JAX gives each task the GPU of its SLURM_LOCALID). On preemption SLURM
# sends SIGTERM: rdlm saves a checkpoint and exits 0, and the job is requeued (--requeue); near the time
# limit the batch shell gets USR1, forwards SIGTERM to the tasks and requeues the job itself. Every start
# resumes from the workdir's newest checkpoint.
#
#   launch/slurm_gpu.sh --nodes=4 --workdir=/shared/runs/huginn --partition=gpu \
#       --extra="--config.data.paths=/shared/data/*.parquet"
#
# Flags (--flag=value or --flag value):
#   --workdir DIR        run directory on a filesystem every node shares, or gs://... (required)
#   --nodes N            nodes (default 1)
#   --gpus-per-node N    GPUs per node, one task each (default 8)
#   --config FILE        training config (default configs/3b5.py)
#   --extra "ARGS"       more rdlm.train arguments, split at spaces, e.g. "--config.model.attention_impl=cudnn"
#   --python PATH        Python of an environment with `pip install -e ".[gcs]" "jax[cuda12]"` (default python3)
#   --partition NAME     SLURM partition (default: the cluster's)
#   --account NAME       SLURM account to charge (default: yours)
#   --time LIMIT         wall-clock limit per start, e.g. 24:00:00 (default 24:00:00)
#   --job-name NAME      job name (default rdlm)
#   --dry-run            print the batch script and the sbatch command, submit nothing
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/launch/common.sh"

NODES=1 GPUS_PER_NODE=8 CONFIG=configs/3b5.py PYTHON=python3 TIME=24:00:00 JOB_NAME=rdlm
EXTRA="" PARTITION="" ACCOUNT="" DRY_RUN=""
parse_flags "workdir nodes gpus-per-node config extra python partition account time job-name" "dry-run" "$@"
require WORKDIR --workdir /shared/runs/huginn
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'."
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$GPUS_PER_NODE'."
[[ $WORKDIR == gs://* || $WORKDIR == /* ]] || die "--workdir must be absolute (shared by all nodes) or gs://."
read -ra EXTRA_ARGS <<<"$EXTRA"
TRAIN=$(quote "$PYTHON" -m rdlm.train --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA_ARGS[@]}")

batch_script() {
    local options=(--job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE"
        --gpus-per-node="$GPUS_PER_NODE" --time="$TIME" --requeue --signal=B:USR1@300 --open-mode=append
        --output=slurm-%x-%j.out ${PARTITION:+--partition="$PARTITION"} ${ACCOUNT:+--account="$ACCOUNT"})
    echo "#!/bin/bash"
    printf '#SBATCH %s\n' "${options[@]}"
    cat <<EOF
set -uo pipefail
cd $(quote "$ROOT")
echo "Start \${SLURM_RESTART_COUNT:-0} of job \$SLURM_JOB_ID on \$SLURM_JOB_NODELIST."

# Preemption: SLURM sends SIGTERM to every task (rdlm saves, exits 0) and requeues; this shell just waits.
trap 'echo "SIGTERM: waiting for the checkpoint."' TERM
# Time limit in 5 minutes: SIGTERM to the tasks, wait for their checkpoint, then requeue the job.
requeue() {
    echo "Time limit near: checkpointing, then requeueing job \$SLURM_JOB_ID."
    scancel --signal=TERM "\$SLURM_JOB_ID"
    while kill -0 \$! 2>/dev/null; do wait \$!; done
    scontrol requeue "\$SLURM_JOB_ID"
    exit 0
}
trap requeue USR1

# One task per GPU; each task sees all of its node's GPUs and JAX takes the one of its SLURM_LOCALID.
# \$! (srun, the only background job) is set as soon as it starts, so a signal can never miss it.
srun --kill-on-bad-exit=1 --cpu-bind=none --gpu-bind=none $TRAIN &
wait \$!
status=\$?
while kill -0 \$! 2>/dev/null; do wait \$!; status=\$?; done
exit "\$status"
EOF
}

# The batch script goes to sbatch on stdin; SLURM keeps its own copy for requeued starts.
if [[ -n $DRY_RUN ]]; then
    echo "sbatch <<'SBATCH'"
    batch_script
    echo "SBATCH"
else
    batch_script | sbatch
fi
