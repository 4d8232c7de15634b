#!/usr/bin/env bash
# A real single-host SLURM with two emulated nodes, for tests and for trying the sbatch scripts on one machine.
#
#   slurm/localcluster.sh start  STATE_DIR   # prints the `export SLURM_CONF=...` line that points clients at it
#   slurm/localcluster.sh status STATE_DIR
#   slurm/localcluster.sh stop   STATE_DIR   # cancels its jobs, then stops every daemon by the PID in its pid file
#
# Installs nothing: needs Debian's slurm-wlm and munge (`apt-get install slurm-wlm`). Must run as root (slurmd runs
# jobs as their submitting user; munged is started as user munge, which it requires). Every daemon listens on
# 127.0.0.1 only; configuration, state, logs, pid files and the munge key live under STATE_DIR. The node names are
# added to /etc/hosts (one line, added once) because the node list is how jobs find their master address.
#
# Nodes: relret-n1 and relret-n2, each with RELRET_NODE_CPUS CPUs (default 2) and 2 fake GPUs (gres files that are
# links to /dev/null, so `--gpus-per-node=2` sets CUDA_VISIBLE_DEVICES without a GPU). One partition, `debug`.
set -euo pipefail

NODES=(relret-n1 relret-n2)
NODE_CPUS=${RELRET_NODE_CPUS:-2}
GPUS_PER_NODE=2
HOSTS_MARK="# relret local SLURM test cluster"

die() {
    echo "localcluster: $*" >&2
    exit 1
}

usage() {
    echo "usage: $0 start|stop|status STATE_DIR" >&2
    exit 2
}

free_ports() { # N -> N distinct TCP ports on 127.0.0.1 that were free a moment ago
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

pid_alive() { # PIDFILE -> true when the file names a live process
    [[ -s $1 ]] && kill -0 "$(<"$1")" 2>/dev/null
}

wait_for() { # SECONDS DESCRIPTION COMMAND... -> retries COMMAND every 0.2 s until it succeeds
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "$what did not happen within the time allowed; logs are in $STATE/log"
        sleep 0.2
    done
}

stop_pids() { # PIDFILE... -> SIGTERM each process, SIGKILL what is left after 15 s; only those PIDs, never by name
    local pids=() pidfile pid
    for pidfile in "$@"; do
        [[ -s $pidfile ]] || continue
        pid=$(<"$pidfile")
        kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    done
    for _ in $(seq 150); do
        alive=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        ((${#alive[@]})) || break
        sleep 0.1
    done
    for pid in "${alive[@]}"; do
        echo "localcluster: pid $pid ignored SIGTERM for 15 s; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -f "$@"
}

write_config() {
    local ctld_port node1_port node2_port
    read -r ctld_port node1_port node2_port < <(free_ports 3)
    mkdir -p "$STATE/ctld" "$STATE/log" "$STATE/gpu" "$STATE/spool/${NODES[0]}" "$STATE/spool/${NODES[1]}"
    for node in "${NODES[@]}"; do
        for ((i = 0; i < GPUS_PER_NODE; i++)); do
            ln -sfn /dev/null "$STATE/gpu/$node-gpu$i"
        done
    done
    cat >"$STATE/gres.conf" <<EOF
NodeName=${NODES[0]} Name=gpu File=$STATE/gpu/${NODES[0]}-gpu[0-$((GPUS_PER_NODE - 1))]
NodeName=${NODES[1]} Name=gpu File=$STATE/gpu/${NODES[1]}-gpu[0-$((GPUS_PER_NODE - 1))]
EOF
    # Settings from ../shared/notes/platform.md: no systemd, no cgroups, no accounting daemon; every listener on
    # 127.0.0.1; pgid process tracking so a job's background processes end with it; a requeued job may start again
    # cred_expire + 1 s later (default 120 s) and the scheduler looks every 2 s, so a requeue takes about 13 s;
    # finished jobs stay visible to `scontrol show job` for a day.
    cat >"$STATE/slurm.conf" <<EOF
ClusterName=relret-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
MinJobAge=86400
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
SchedulerParameters=bf_interval=2,sched_interval=2
NodeName=${NODES[0]} NodeAddr=127.0.0.1 Port=$node1_port CPUs=$NODE_CPUS RealMemory=4096 Gres=gpu:$GPUS_PER_NODE State=UNKNOWN
NodeName=${NODES[1]} NodeAddr=127.0.0.1 Port=$node2_port CPUs=$NODE_CPUS RealMemory=4096 Gres=gpu:$GPUS_PER_NODE State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

add_hosts() {
    local missing=()
    for node in "${NODES[@]}"; do
        getent hosts "$node" >/dev/null || missing+=("$node")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ -w /etc/hosts ]] || die "node names ${missing[*]} do not resolve and /etc/hosts is not writable; add \"127.0.0.1 ${NODES[*]}\" to it"
    [[ -z $(tail -c 1 /etc/hosts) ]] || echo >>/etc/hosts
    echo "127.0.0.1 ${missing[*]} $HOSTS_MARK" >>/etc/hosts
}

start() {
    for exe in munged slurmctld slurmd sinfo scontrol srun; do
        command -v "$exe" >/dev/null || die "$exe not found: install Debian's slurm-wlm (apt-get install slurm-wlm munge)"
    done
    ((EUID == 0)) || die "must run as root (slurmd starts jobs as their user; munged is started as user munge)"
    id munge >/dev/null 2>&1 || die "user munge does not exist: install the munge package"
    if pid_alive "$STATE/slurmctld.pid"; then
        die "a cluster is already running from $STATE; stop it first ($0 stop $STATE)"
    fi
    mkdir -p "$STATE"
    STATE=$(cd "$STATE" && pwd)
    # munged (user munge) must reach its directory through STATE_DIR, and every client its socket; it refuses
    # group- or world-writable directories.
    chmod 755 "$STATE"
    mkdir -p "$STATE/munge"
    [[ -s $STATE/munge/munge.key ]] || mungekey --create --keyfile="$STATE/munge/munge.key"
    chown -R munge:munge "$STATE/munge"
    chmod 755 "$STATE/munge"
    chmod 600 "$STATE/munge/munge.key"
    add_hosts
    write_config
    export SLURM_CONF=$STATE/slurm.conf

    runuser -u munge -- munged --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
        --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" \
        --seed-file="$STATE/munge/munged.seed" ||
        die "munged did not start; see $STATE/munge/munged.log"
    slurmctld -f "$SLURM_CONF" || die "slurmctld did not start; see $STATE/log/slurmctld.log"
    for node in "${NODES[@]}"; do
        slurmd -f "$SLURM_CONF" -N "$node" || die "slurmd $node did not start; see $STATE/log/slurmd-$node.log"
    done
    wait_for 30 "slurmctld answering scontrol ping" scontrol ping
    wait_for 60 "both nodes idle" nodes_idle
    # One launch across both nodes proves slurmd, munge credentials and step I/O work before anyone relies on it.
    local hosts
    hosts=$(timeout 60 srun --nodes=2 --ntasks-per-node=1 printenv SLURMD_NODENAME | sort | tr '\n' ' ') ||
        die "the launch check (srun --nodes=2 printenv SLURMD_NODENAME) failed; logs are in $STATE/log"
    [[ $hosts == "${NODES[*]} " ]] || die "the launch check ran on '$hosts', expected '${NODES[*]}'"
    echo "export SLURM_CONF=$SLURM_CONF"
}

nodes_idle() {
    [[ $(sinfo --noheader --responding --states=idle --format=%n | sort | tr '\n' ' ') == "${NODES[*]} " ]]
}

status() {
    export SLURM_CONF=$STATE/slurm.conf
    local all_up=0
    for name in munge/munged slurmctld slurmd-"${NODES[0]}" slurmd-"${NODES[1]}"; do
        if pid_alive "$STATE/$name.pid"; then
            echo "${name#munge/}: running (pid $(<"$STATE/$name.pid"))"
        else
            echo "${name#munge/}: not running"
            all_up=1
        fi
    done
    if ((all_up == 0)); then
        sinfo --Node --format="%N %P %T %c %G"
        squeue --states=all --format="%i %j %T %R"
    fi
    return $all_up
}

stop() {
    [[ -d $STATE ]] || die "no state directory $STATE"
    export SLURM_CONF=$STATE/slurm.conf
    if pid_alive "$STATE/slurmctld.pid"; then
        # Jobs first, so that no training process outlives the cluster that started it.
        scancel --quiet --partition=debug 2>/dev/null || true
        for _ in $(seq 75); do
            [[ -z $(squeue --noheader --states=PENDING,RUNNING,COMPLETING,REQUEUED,SUSPENDED 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    # The daemons together (each takes about 2 s to exit), munged last: the others authenticate through it.
    stop_pids "$STATE/slurmd-${NODES[0]}.pid" "$STATE/slurmd-${NODES[1]}.pid" "$STATE/slurmctld.pid"
    stop_pids "$STATE/munge/munged.pid"
}

(($# == 2)) || usage
STATE=$2
case $1 in
start) start ;;
stop) stop ;;
status) status ;;
*) usage ;;
esac
