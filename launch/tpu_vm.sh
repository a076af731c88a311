#!/usr/bin/env bash
# Train rdlm on a Cloud TPU slice: create the TPU VM (directly or as a queued resource), install this repo on
# every worker, run the same training command on all of them, and after a preemption delete, recreate and
# rerun; rdlm resumes from the newest checkpoint in the gs:// workdir.
#
#   launch/tpu_vm.sh --name=huginn --project=my-proj --zone=us-east5-a --accelerator=v5p-64 \
#       --workdir=gs://my-bucket/huginn --extra="--config.data.paths=gs://my-bucket/data/*.parquet"
#
# Flags (--flag=value or --flag value):
#   --name NAME          TPU VM name, also the queued resource's (required)
#   --project ID         Google Cloud project (required)
#   --zone ZONE          zone with capacity for the accelerator, e.g. us-east5-a (required)
#   --workdir gs://...   run directory: checkpoints, metrics (required; gs:// so a recreated VM finds it)
#   --accelerator TYPE   accelerator type (default v5p-64 = 32 chips; v4 and v5p names count TensorCores)
#   --version RUNTIME    TPU software version (default by family: v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5,
#                        v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e)
#   --config FILE        training config (default configs/3b5.py)
#   --extra "ARGS"       more rdlm.train arguments, split at spaces, e.g. "--config.train.num_steps=1000"
#   --queued             request a queued resource (waits in the queue for capacity) instead of a direct create
#   --spot               Spot capacity: cheaper, preemptible, restarted by the resume loop
#   --preemptible        legacy preemptible TPU VM (not with --queued)
#   --repo URL           git URL (optionally URL#branch) cloned on the workers; default: copy this checkout
#   --max-restarts N     stop after N recreations (default 100)
#   --dry-run            print every command, one per line and runnable, and run nothing
#
# Run it where it can stay up for the whole run (tmux, a small VM): the training output streams back here.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/launch/common.sh"

ACCELERATOR=v5p-64 CONFIG=configs/3b5.py MAX_RESTARTS=100 VERSION="" EXTRA="" REPO=""
QUEUED="" SPOT="" PREEMPTIBLE="" DRY_RUN=""
parse_flags "name project zone workdir accelerator version config extra repo max-restarts" \
    "queued spot preemptible dry-run" "$@"
require NAME --name huginn
require PROJECT --project my-project
require ZONE --zone us-east5-a
require WORKDIR --workdir gs://my-bucket/huginn
[[ $WORKDIR == gs://* ]] || die "--workdir must be a gs:// path so every worker and every recreated VM sees it."
[[ -z $QUEUED || -z $PREEMPTIBLE ]] || die "--preemptible is for direct creates; use --spot with --queued."
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts must be a whole number, got '$MAX_RESTARTS'."
declare -A RUNTIMES=([v4]=tpu-ubuntu2204-base [v5p]=v2-alpha-tpuv5 [v5litepod]=v2-alpha-tpuv5-lite [v6e]=v2-alpha-tpuv6e)
VERSION=${VERSION:-${RUNTIMES[${ACCELERATOR%%-*}]:-}}
[[ -n $VERSION ]] || die "no default --version for --accelerator=$ACCELERATOR; pass the TPU software version."
read -ra EXTRA_ARGS <<<"$EXTRA"
JAX_VERSION=$(sed -n 's/.*"jax==\([0-9.]*\)".*/\1/p' "$ROOT/setup.py")
LOCATION=(--zone="$ZONE" --project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)
SSH=("${TPU[@]}" ssh "$NAME" "${LOCATION[@]}" --worker=all)

create() {
    if [[ -n $QUEUED ]]; then
        run "${QR[@]}" create "$NAME" --node-id="$NAME" --accelerator-type="$ACCELERATOR" \
            --runtime-version="$VERSION" "${LOCATION[@]}" ${SPOT:+--spot}
    else
        run "${TPU[@]}" create "$NAME" --accelerator-type="$ACCELERATOR" --version="$VERSION" "${LOCATION[@]}" \
            ${SPOT:+--spot} ${PREEMPTIBLE:+--preemptible}
    fi
}

delete() {
    if [[ -n $QUEUED ]]; then run "${QR[@]}" delete "$NAME" "${LOCATION[@]}" --force --quiet
    else run "${TPU[@]}" delete "$NAME" "${LOCATION[@]}" --quiet; fi
}

# The TPU's state (READY when usable), or nothing while it does not exist.
state() {
    "${TPU[@]}" describe "$NAME" "${LOCATION[@]}" --format='value(state)' 2>/dev/null || true
}

# Creates the TPU, or deletes and recreates it after a preemption, until it is READY.
ensure_ready() {
    local node
    while node=$(state) && [[ $node != READY ]]; do
        if [[ -n $QUEUED ]]; then
            case $("${QR[@]}" describe "$NAME" "${LOCATION[@]}" --format='value(state.state)' 2>/dev/null || true) in
                "") create || true ;;
                FAILED | SUSPENDED) delete ;;
            esac
        else
            case $node in
                "") create || true ;;
                PREEMPTED | TERMINATED | STOPPED) delete ;;
            esac
        fi
        echo "Waiting for $NAME to be READY (now: ${node:-absent})." >&2
        sleep "${RDLM_POLL_SECONDS:-60}"
    done
}

# Copies (or clones) the repo to every worker and installs it with the TPU build of the pinned jax.
install() {
    local fetch setup="python3 -m pip install -q --user uv && ~/.local/bin/uv venv -q --allow-existing --python 3.11 ~/rdlm-venv"
    setup+=" && cd ~/rdlm && ~/.local/bin/uv pip install -q --python ~/rdlm-venv/bin/python -e '.[gcs]' 'jax[tpu]==$JAX_VERSION'"
    if [[ -n $REPO ]]; then
        fetch="rm -rf ~/rdlm && git clone -q $(quote "${REPO%%#*}") ~/rdlm"
        [[ $REPO != *#* ]] || fetch+=" && git -C ~/rdlm checkout -q $(quote "${REPO#*#}")"
    else
        local tarball=${TMPDIR:-/tmp}/rdlm-$NAME.tgz
        run tar -czf "$tarball" --exclude=.git --exclude=runs --exclude=__pycache__ -C "$ROOT" . &&
            run "${TPU[@]}" scp "$tarball" "$NAME:rdlm.tgz" "${LOCATION[@]}" --worker=all || return
        fetch="rm -rf ~/rdlm && mkdir ~/rdlm && tar -xzf ~/rdlm.tgz -C ~/rdlm"
    fi
    run "${SSH[@]}" --command="$fetch && $setup"
}

# All workers run the same command. JAX_COORDINATOR_ADDRESS (worker 0) makes rdlm call
# jax.distributed.initialize(), which reads the process count and ids from the TPU metadata.
train() {
    local command lookup=("${TPU[@]}" describe "$NAME" "${LOCATION[@]}" --format='value(networkEndpoints[0].ipAddress)')
    command="cd ~/rdlm && JAX_COORDINATOR_ADDRESS=@COORDINATOR@:8476 ~/rdlm-venv/bin/python -m rdlm.train"
    command+=" $(quote --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA_ARGS[@]}")"
    if [[ -n $DRY_RUN ]]; then
        echo "COORDINATOR=\$($(quote "${lookup[@]}"))"
        local word=--command=$command
        word=${word//\\/\\\\} word=${word//\"/\\\"} word=${word//\$/\\\$} word=${word//\`/\\\`}
        echo "$(quote "${SSH[@]}") \"${word/@COORDINATOR@/\$COORDINATOR}\""
    else
        local address
        address=$("${lookup[@]}") && "${SSH[@]}" --command="${command/@COORDINATOR@/$address}"
    fi
}

if [[ -n $DRY_RUN ]]; then
    create
    echo "# wait until this prints READY:"
    quote "${TPU[@]}" describe "$NAME" "${LOCATION[@]}" --format='value(state)'
    install
    train
    echo "# resume loop: while the TPU is not READY after the run (preempted), delete it, create it again and"
    echo "# repeat from the wait above, at most $MAX_RESTARTS times; rdlm resumes from $WORKDIR."
    exit 0
fi

restarts=0
while :; do
    ensure_ready
    status=0
    { install && train; } || status=$?
    if [[ $(state) == READY ]]; then
        ((status != 0)) || { echo "Training finished; delete the TPU with: $(DRY_RUN=1 delete)"; exit 0; }
        die "training failed on a healthy $NAME (exit $status); fix the cause and rerun this command to resume."
    fi
    restarts=$((restarts + 1))
    ((restarts <= MAX_RESTARTS)) || die "$NAME was preempted $restarts times; rerun this command to go on."
    echo "$NAME is no longer READY (preempted): recreating it, restart $restarts of $MAX_RESTARTS." >&2
done
