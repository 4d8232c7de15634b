# shellcheck shell=bash
# Shared by the sbatch scripts (sourced, not run): where the repository is, the master address, one training process
# per GPU through srun, and what to do when SLURM warns of the end (preemption or time limit).
#
# Signals and requeue. The scripts ask for `--signal=B:USR1@300`: SLURM sends SIGUSR1 to this batch shell 300 s
# before the time limit (and `scancel --batch --signal=USR1 JOB` sends it by hand). The trap below sends SIGUSR1 to
# srun, which forwards it to every training process; training writes a complete checkpoint on every rank and exits
# 75; the shell waits for that, then runs `scontrol requeue $SLURM_JOB_ID`. The requeued job starts the same command,
# and training resumes from checkpoints/latest in its run directory by itself. SIGTERM to this shell is handled the
# same way, but is still forwarded to srun as SIGUSR1: srun answers SIGTERM by killing the step outright, before
# any checkpoint. (At the time limit itself SLURM sends SIGTERM to every process and SIGKILL KillWait seconds later;
# only the early warning leaves time for a checkpoint.) `scancel JOB` reaches this shell as SIGTERM too: the shell
# requeues only while SLURM still reports the job RUNNING, so a cancelled (or timed-out) job stays ended.
#
# Restarts. SLURM counts requeues in SLURM_RESTART_COUNT. The job requeues itself while that count is below
# RELRET_MAX_RESTARTS (default 10): after a warning signal, and after a training failure in which the run made
# progress (status.json's step advanced; a transient fault such as a lost node or a collective timeout). A failure
# with no progress in the attempt (a bad config, missing data, a crash at the same step again) is not requeued.
#
# Environment read here (all optional):
#   RELRET_ROOT           the repository (default: found by each script from its submitted path)
#   RELRET_PYTHON         the Python that runs training (default: python3 on PATH; the launcher passes its own)
#   RELRET_MAX_RESTARTS   see above (default 10)
#   RELRET_MASTER_PORT    rendezvous port (default 20000 + job id mod 20000)
#   RELRET_STATUS_DIR     where a command stage (shard, evaluate) records status.json
#   RELRET_TRAIN_SCRIPT   the training entry point (default $RELRET_ROOT/relret/train.py)

relret_log() {
    echo "[$(date '+%F %T')] relret job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: $*"
}

relret_die() {
    relret_log "error: $*" >&2
    exit 2
}

relret_check_root() {
    [[ -n ${RELRET_ROOT:-} && -f $RELRET_ROOT/slurm/lib.sh ]] ||
        relret_die "cannot find the relret repository (RELRET_ROOT=${RELRET_ROOT:-}); set RELRET_ROOT to its path"
    export RELRET_ROOT
    export RELRET_PYTHON=${RELRET_PYTHON:-python3}
    command -v "$RELRET_PYTHON" >/dev/null ||
        relret_die "no Python at '$RELRET_PYTHON'; activate the environment before sbatch or set RELRET_PYTHON"
    relret_trap_signals
}

relret_setup_world() {
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_PORT=${RELRET_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
    # One thread per rank unless the job asked for CPUs per task (more threads than cores slows every rank down).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

    local gpus=${SLURM_GPUS_ON_NODE:-0}
    RELRET_TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-}
    if ((gpus > 0)) && [[ $RELRET_TASKS_PER_NODE != "$gpus" ]]; then
        relret_die "this job has $gpus GPU(s) per node but ${RELRET_TASKS_PER_NODE:-no} --ntasks-per-node; one" \
            "training process per GPU needs --ntasks-per-node=$gpus (the launcher sets both from gpus_per_node)"
    fi
    # --kill-on-bad-exit=0: a rank that exits 75 after its checkpoint must not kill ranks still writing theirs.
    # --wait=120: but a rank that crashes takes the others down two minutes later instead of hanging in a collective.
    RELRET_SRUN_ARGS=(--nodes="$SLURM_JOB_NUM_NODES" --kill-on-bad-exit=0 --wait=120)
    [[ -n ${SLURM_NTASKS:-} ]] && RELRET_SRUN_ARGS+=(--ntasks="$SLURM_NTASKS")
    [[ -n $RELRET_TASKS_PER_NODE ]] && RELRET_SRUN_ARGS+=(--ntasks-per-node="$RELRET_TASKS_PER_NODE")
    # srun no longer inherits --cpus-per-task from sbatch (SLURM 22.05): pass it on.
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && RELRET_SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    return 0
}

relret_option() { # NAME ARGS... -> the value given as `NAME VALUE` or `NAME=VALUE` in ARGS, or nothing
    local name=$1
    shift
    while (($#)); do
        case $1 in
        "$name") echo "${2:-}" && return 0 ;;
        "$name"=*) echo "${1#*=}" && return 0 ;;
        esac
        shift
    done
}

relret_status_step() { # RUN_DIR -> status.json's step, or -1 when there is none yet (relret.run_dir's contract)
    PYTHONPATH="$RELRET_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$RELRET_PYTHON" -m relret.run_dir step "$1" 2>/dev/null || echo -1
}

relret_write_status() { # DIR STATE EXIT_CODE -> DIR/status.json for a command stage, written atomically
    local args=(write-status "$1" --state "$2" --kind command --pid "$$")
    [[ -n ${3:-} ]] && args+=(--exit-code "$3")
    mkdir -p "$1"
    PYTHONPATH="$RELRET_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$RELRET_PYTHON" -m relret.run_dir "${args[@]}"
}

relret_on_signal() { # SIGNAL
    RELRET_TRAPPED=1
    if [[ -n $RELRET_CAUGHT ]]; then
        relret_log "caught SIG$1 again; still waiting for the processes to checkpoint and exit"
        return
    fi
    RELRET_CAUGHT=$1
    if [[ -z $RELRET_CHILD ]]; then
        relret_log "caught SIG$1 before the processes started; they are told as soon as they do"
        return
    fi
    relret_log "caught SIG$1: sending SIGUSR1 to the step so that every rank checkpoints and exits"
    kill -USR1 "$RELRET_CHILD" 2>/dev/null || true
}

relret_trap_signals() { # from the first line on, so that an early signal is remembered rather than fatal
    RELRET_CAUGHT=""
    RELRET_CHILD=""
    trap 'relret_on_signal USR1' USR1
    trap 'relret_on_signal TERM' TERM
}

relret_run_child() { # COMMAND... -> runs it in the background; RELRET_RC is its exit code
    "$@" &
    RELRET_CHILD=$!
    [[ -n $RELRET_CAUGHT ]] && kill -USR1 "$RELRET_CHILD" 2>/dev/null
    # `wait` returns early (status > 128) whenever a trapped signal arrives; wait again until the child has exited.
    while :; do
        RELRET_TRAPPED=0
        RELRET_RC=0
        wait "$RELRET_CHILD" || RELRET_RC=$?
        ((RELRET_TRAPPED)) || break
    done
    trap - USR1 TERM
}

relret_requeue_or_exit() { # EXIT_CODE REASON -> requeues the job if restarts remain; returns EXIT_CODE
    local rc=$1 reason=$2 restarts=${SLURM_RESTART_COUNT:-0} max=${RELRET_MAX_RESTARTS:-10}
    if ((restarts >= max)); then
        relret_log "$reason; not requeueing: the job has restarted $restarts time(s) and RELRET_MAX_RESTARTS=$max." \
            "Fix the cause and submit again (training resumes from its checkpoint), or raise the limit"
        return "$rc"
    fi
    # A job that SLURM itself is ending (scancel, time limit, preemption) must not come back: `scancel JOB` also
    # reaches this shell as SIGTERM, and only the job's state tells it from a warning sent to be answered.
    local state
    state=$(scontrol show job -o "$SLURM_JOB_ID" | grep -o 'JobState=[^ ]*' || true)
    if [[ $state != JobState=RUNNING ]]; then
        relret_log "$reason; not requeueing: the job is ${state#JobState=} (cancelled, timed out or preempted by" \
            "SLURM). Submit it again to resume from its checkpoint"
        return "$rc"
    fi
    relret_log "$reason; requeueing (restart $((restarts + 1)) of at most $max)"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        relret_log "scontrol requeue $SLURM_JOB_ID failed (the job may be ending already); submit it again to resume"
    fi
    return "$rc"
}

relret_train() { # TRAIN_ARGS... -> one training process per GPU on every node, with the requeue policy above
    relret_check_root
    relret_setup_world
    local run_dir step_before step_after
    run_dir=$(relret_option --run-dir "$@")
    [[ -n $run_dir ]] || relret_die "no --run-dir in the arguments ($*); pass --config CFG --run-dir DIR"
    step_before=$(relret_status_step "$run_dir")
    relret_log "start on $SLURM_JOB_NODELIST: ${SLURM_NTASKS:-?} process(es), master $MASTER_ADDR:$MASTER_PORT," \
        "run dir $run_dir (step $step_before)"
    relret_run_child srun "${RELRET_SRUN_ARGS[@]}" \
        "$RELRET_PYTHON" "${RELRET_TRAIN_SCRIPT:-$RELRET_ROOT/relret/train.py}" "$@"
    local rc=$RELRET_RC
    if ((rc == 0)); then
        relret_log "training finished (exit 0)"
        return 0
    fi
    if [[ -n $RELRET_CAUGHT ]]; then
        relret_requeue_or_exit "$rc" "training stopped after SIG$RELRET_CAUGHT (exit $rc)"
        return
    fi
    step_after=$(relret_status_step "$run_dir")
    if ((step_after > step_before)); then
        relret_requeue_or_exit "$rc" "training failed (exit $rc) after progressing from step $step_before to $step_after"
        return
    fi
    relret_log "training failed (exit $rc) without progress in this attempt (step $step_before); not requeueing." \
        "See the error above; after fixing it, submit again (training resumes from its checkpoint)"
    return "$rc"
}

relret_command() { # COMMAND... -> a single-process stage (shard, evaluate) with status.json and the same signals
    relret_check_root
    (($#)) || relret_die "no command given; usage: sbatch slurm/<stage>.sh COMMAND [ARGS...]"
    local status_dir=${RELRET_STATUS_DIR:-}
    relret_log "start on $(hostname): $*"
    [[ -n $status_dir ]] && relret_write_status "$status_dir" running
    relret_run_child "$@"
    local rc=$RELRET_RC
    if ((rc == 0)); then
        [[ -n $status_dir ]] && relret_write_status "$status_dir" completed 0
        relret_log "finished (exit 0)"
        return 0
    fi
    if [[ -n $RELRET_CAUGHT ]]; then
        [[ -n $status_dir ]] && relret_write_status "$status_dir" interrupted "$rc"
        relret_requeue_or_exit "$rc" "stopped after SIG$RELRET_CAUGHT (exit $rc)"
        return
    fi
    [[ -n $status_dir ]] && relret_write_status "$status_dir" failed "$rc"
    relret_log "failed (exit $rc)"
    return "$rc"
}
