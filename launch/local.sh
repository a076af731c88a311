#!/usr/bin/env bash
# Train rdlm on this host: one process over all local devices, or --processes N processes joined through
# jax.distributed at localhost:PORT (process i gets --process_id=i and its share of the devices). Waits for
# all of them; when one fails the others are stopped and its exit status is returned. SIGINT/SIGTERM are
# passed on, so rdlm saves a checkpoint; rerunning the same command resumes from the workdir.
#
#   launch/local.sh --config=configs/tiny.py --workdir=runs/tiny
#   launch/local.sh --processes=2 --cpu-devices=4 --workdir=runs/tiny2 --extra="--config.train.num_steps=50"
#
# Flags (--flag=value or --flag value):
#   --workdir DIR          run directory, local or gs:// (required; relative paths start at the repo root)
#   --config FILE          training config (default configs/tiny.py)
#   --extra "ARGS"         more rdlm.train arguments, split at spaces, e.g. "--config.train.num_steps=50"
#   --processes N          processes on this host (default 1)
#   --cpu-devices K        run on the CPU with K fake devices per process (XLA_FLAGS)
#   --gpus-per-process G   give process i the GPUs i*G .. i*G+G-1 (CUDA_VISIBLE_DEVICES)
#   --port PORT            coordinator port for --processes > 1 (default 12355)
#   --python PATH          Python with rdlm installed (default: python3)
#   --dry-run              print the commands, one per line and runnable, and run nothing
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/launch/common.sh"

CONFIG=configs/tiny.py PROCESSES=1 PORT=12355 PYTHON=python3 EXTRA="" CPU_DEVICES="" GPUS_PER_PROCESS="" DRY_RUN=""
parse_flags "workdir config extra processes cpu-devices gpus-per-process port python" "dry-run" "$@"
require WORKDIR --workdir runs/tiny
for flag in PROCESSES PORT ${CPU_DEVICES:+CPU_DEVICES} ${GPUS_PER_PROCESS:+GPUS_PER_PROCESS}; do
    [[ ${!flag} =~ ^[1-9][0-9]*$ ]] || die "--$(echo "${flag,,}" | tr _ -) must be a positive integer, got '${!flag}'."
done
[[ -z $CPU_DEVICES || -z $GPUS_PER_PROCESS ]] || die "use --cpu-devices or --gpus-per-process, not both."
read -ra EXTRA_ARGS <<<"$EXTRA"
cd "$ROOT"

# The environment and command of process $1.
command_of() {
    local i=$1 env=() cmd=("$PYTHON" -m rdlm.train --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA_ARGS[@]}")
    if [[ -n $CPU_DEVICES ]]; then
        env+=(JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$CPU_DEVICES")
    elif [[ -n $GPUS_PER_PROCESS ]]; then
        env+=(CUDA_VISIBLE_DEVICES="$(seq -s, $((i * GPUS_PER_PROCESS)) $((i * GPUS_PER_PROCESS + GPUS_PER_PROCESS - 1)))")
    fi
    if ((PROCESSES > 1)); then
        cmd+=(--coordinator_address="localhost:$PORT" --num_processes="$PROCESSES" --process_id="$i")
    fi
    COMMAND=(env "${env[@]}" "${cmd[@]}")
    ((${#env[@]})) || COMMAND=("${cmd[@]}")
}

if [[ -n $DRY_RUN ]]; then
    quote cd "$ROOT"
    for ((i = 0; i < PROCESSES; i++)); do
        command_of "$i"
        if ((PROCESSES > 1)); then echo "$(quote "${COMMAND[@]}") &"; else quote "${COMMAND[@]}"; fi
    done
    ((PROCESSES > 1)) && echo "wait"
    exit 0
fi

if ((PROCESSES == 1)); then
    command_of 0
    exec "${COMMAND[@]}"
fi

# Copies stdin to stdout with "[i] " before each line.
prefix() {
    local line
    while IFS= read -r line || [[ -n $line ]]; do printf '[%s] %s\n' "$1" "$line"; done
}

PIDS=()
stop_all() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap 'stop_all' INT TERM
for ((i = 0; i < PROCESSES; i++)); do
    command_of "$i"
    "${COMMAND[@]}" > >(prefix "$i") 2> >(prefix "$i" >&2) &
    PIDS+=($!)
done

# The first failure stops the rest (they would wait forever in a collective); its status is ours.
status=0
while ((${#PIDS[@]})); do
    for index in "${!PIDS[@]}"; do
        pid=${PIDS[index]}
        kill -0 "$pid" 2>/dev/null && continue
        unset "PIDS[index]"
        code=0
        wait "$pid" || code=$?
        if ((code != 0 && status == 0)); then
            status=$code
            echo "error: process $index exited with status $code; stopping the others." >&2
            stop_all
        fi
    done
    sleep 1
done
exit "$status"
