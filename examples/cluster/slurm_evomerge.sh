#!/usr/bin/env bash
#SBATCH --job-name=evomerge
#SBATCH --nodes=3
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
# An evomerge search on a SLURM allocation (docs/CLUSTER.md): a Ray head on the first node, a Ray worker node on
# every other node, the driver on the head; the nodes are stopped when the driver ends.
#
#   sbatch --nodes=3 --gpus-per-node=8 examples/cluster/slurm_evomerge.sh EXPERIMENT.yaml RUN_DIR [OPTIONS]
#
# OPTIONS go to `evomerge run`. A RUN_DIR that holds a run is resumed (a requeued job continues its search).
# Every worker node offers EVOMERGE_SLOTS units of the Ray resource `evomerge_worker`, the head none: an
# experiment with `workers: {resources: {evomerge_worker: 1}, count: WORKER_NODES x SLOTS}` puts its workers on
# the worker nodes and leaves the head to the driver and Ray's control plane.
#
# The steps one by one (tests/test_cluster.py runs them on one machine, a node per loopback address):
#   slurm_evomerge.sh start                              start the nodes, wait until all joined, print the address
#   slurm_evomerge.sh run EXPERIMENT.yaml RUN_DIR [OPTIONS]   the driver, on this node (the head)
#   slurm_evomerge.sh stop                               stop the nodes this script started
#
# Settings (environment variables):
#   EVOMERGE_NODES     node names or IPs, the head first (default: the allocation's, `scontrol show hostnames`)
#   EVOMERGE_ON        the command prefix that runs a command on node N (N appended):
#                      default "srun --nodes=1 --ntasks=1 --overlap -w"; "" runs every node on this machine
#   EVOMERGE_RAY_TMP   a node-local folder for Ray's temporary files and the sources' copies (default
#                      /tmp/evomerge-ray-$USER); each node uses EVOMERGE_RAY_TMP/NODE, this script's state is
#                      kept in EVOMERGE_RAY_TMP/cluster.env on the head; keep it short (Ray's socket paths
#                      below EVOMERGE_RAY_TMP/NODE/session_*/sockets/ must fit in 107 bytes)
#   EVOMERGE_RAY_PORT  the head's port (6379); EVOMERGE_DASHBOARD_PORT its dashboard, on 127.0.0.1 only (8265)
#   EVOMERGE_SLOTS     evomerge_worker units per worker node (default: the node's GPUs, at least 1)
#   EVOMERGE_NODE_CPUS CPUs each node offers Ray (default: Ray's count); EVOMERGE_OBJECT_STORE_BYTES the object
#                      store per node (default: Ray's)
#   EVOMERGE, RAY      the evomerge and ray commands (default: the ones on PATH)
set -euo pipefail

ON=${EVOMERGE_ON-"srun --nodes=1 --ntasks=1 --overlap -w"}
TMP_ROOT=${EVOMERGE_RAY_TMP:-/tmp/evomerge-ray-${USER:-$(id -u)}}
PORT=${EVOMERGE_RAY_PORT:-6379}
DASHBOARD_PORT=${EVOMERGE_DASHBOARD_PORT:-8265}
EVOMERGE=${EVOMERGE:-evomerge}
RAY=${RAY:-ray}
STATE="$TMP_ROOT/cluster.env"
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}

nodes() {
    if [[ -n "${EVOMERGE_NODES:-}" ]]; then echo "$EVOMERGE_NODES"; else scontrol show hostnames "$SLURM_JOB_NODELIST"; fi
}

on() {  # on NODE COMMAND...: run COMMAND on NODE
    local node=$1; shift
    if [[ -n "$ON" ]]; then $ON "$node" "$@"; else "$@"; fi
}

ip_of() {  # a node's IP: itself when it is one, else the first address the node reports
    if [[ $1 =~ ^[0-9.]+$ ]]; then echo "$1"; else on "$1" hostname --ip-address | awk '{print $1}'; fi
}

slots_of() {  # evomerge_worker units of a worker node: EVOMERGE_SLOTS, else its GPU count, at least 1
    local n=${EVOMERGE_SLOTS:-$(on "$1" bash -c 'nvidia-smi -L 2>/dev/null | wc -l')}
    echo $(( n > 0 ? n : 1 ))
}

start_node() {  # start_node NODE IP ARGS...: a blocking `ray start` on NODE in its own process group
    local node=$1 ip=$2; shift 2
    local dir="$TMP_ROOT/$node"
    mkdir -p "$dir/tmp"
    local opts=(--block --node-ip-address="$ip" --temp-dir="$dir" --disable-usage-stats)
    [[ -n "${EVOMERGE_NODE_CPUS:-}" ]] && opts+=(--num-cpus="$EVOMERGE_NODE_CPUS")
    [[ -n "${EVOMERGE_OBJECT_STORE_BYTES:-}" ]] && opts+=(--object-store-memory="$EVOMERGE_OBJECT_STORE_BYTES")
    local prefix=()
    [[ -n "$ON" ]] && read -r -a prefix <<< "$ON $node"
    # TMPDIR: the node's own disk for the workers' copies of the sources (workers.sources: object_store)
    setsid "${prefix[@]}" env TMPDIR="$dir/tmp" "$RAY" start "${opts[@]}" "$@" > "$dir.log" 2>&1 < /dev/null &
    echo $! > "$dir.pid"
    echo "PIDS+=($!)" >> "$STATE"
}

wait_port() {  # wait_port HOST PORT: until the head's GCS accepts connections (worker nodes can join then)
    local end=$((SECONDS + ${EVOMERGE_START_TIMEOUT:-300}))
    until (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; do
        ((SECONDS < end)) || { echo "slurm_evomerge.sh: the Ray head at $1:$2 does not answer" >&2; return 1; }
        sleep 0.5
    done
}

wait_started() {  # wait_started NODE...: until every node's `ray start` says it runs (or one of them ended)
    local end=$((SECONDS + ${EVOMERGE_START_TIMEOUT:-300})) node
    for node in "$@"; do
        until grep -q "Ray runtime started" "$TMP_ROOT/$node.log" 2>/dev/null; do
            if ! kill -0 "$(cat "$TMP_ROOT/$node.pid")" 2>/dev/null || ((SECONDS > end)); then
                echo "slurm_evomerge.sh: the Ray node on $node did not start:" >&2
                tail -5 "$TMP_ROOT/$node.log" >&2
                return 1
            fi
            sleep 0.5
        done
    done
}

start() {
    mkdir -p "$TMP_ROOT"
    local all head ip node
    read -r -a all <<< "$(nodes | xargs)"
    head=${all[0]}
    ip=$(ip_of "$head")
    echo "HEAD_ADDRESS=$ip:$PORT" > "$STATE"
    echo "PIDS=()" >> "$STATE"
    start_node "$head" "$ip" --head --port="$PORT" --include-dashboard=true --dashboard-host=127.0.0.1 \
        --dashboard-port="$DASHBOARD_PORT"
    wait_port "$ip" "$PORT"
    for node in "${all[@]:1}"; do
        start_node "$node" "$(ip_of "$node")" --address="$ip:$PORT" \
            --resources="{\"evomerge_worker\": $(slots_of "$node")}"
    done
    wait_started "${all[@]}"
    echo "$ip:$PORT"
}

stop() {  # SIGTERM to every node's process group, SIGKILL to what is left after EVOMERGE_STOP_GRACE (10 s)
    [[ -f "$STATE" ]] || return 0
    # shellcheck disable=SC1090
    source "$STATE"
    local pid end=$((SECONDS + ${EVOMERGE_STOP_GRACE:-10}))
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        while kill -0 -- "-$pid" 2>/dev/null && ((SECONDS < end)); do sleep 0.2; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do  # gone, not only signalled
        while kill -0 -- "-$pid" 2>/dev/null; do sleep 0.1; done
    done
    rm -f "$STATE"
}

run() {  # run EXPERIMENT RUN_DIR [OPTIONS]: the driver, joined to the cluster started here
    local experiment=$1 run_dir=$2; shift 2
    # shellcheck disable=SC1090
    source "$STATE"
    if [[ -f "$run_dir/config.yaml" ]]; then
        "$EVOMERGE" run --resume "$run_dir" --address "$HEAD_ADDRESS" "$@"
    else
        "$EVOMERGE" run "$experiment" --out "$run_dir" --address "$HEAD_ADDRESS" "$@"
    fi
}

case "${1:-}" in
    start|stop) "$1" ;;
    run) shift; run "$@" ;;
    "") echo "usage: slurm_evomerge.sh EXPERIMENT.yaml RUN_DIR [OPTIONS] | start | run ... | stop" >&2; exit 2 ;;
    *) trap stop EXIT; start > /dev/null; run "$@" ;;
esac
