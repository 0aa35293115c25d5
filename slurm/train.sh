#!/usr/bin/env bash
# Multi-node, preemption-safe training of lesionseg on Slurm.
#
#   mkdir -p logs
#   sbatch [sbatch options] slurm/train.sh [--config FILE.yaml] [key=value …]
#
# Submit from the repository root (logs/ and runs/ are relative to it). Examples:
#   sbatch -J isic-b16 slurm/train.sh data.shards=shards/isic2016 optim.epochs=30
#   sbatch -J isic-4n --nodes=4 --gpus-per-node=8 slurm/train.sh data.shards=shards/isic2016
#   LESIONSEG_CPU=1 sbatch --nodes=1 --gpus-per-node=0 slurm/train.sh …   # CPU nodes
#   sbatch -J isic-cv5 --array=0-4 slurm/train.sh data.shards=shards/isic2016 data.folds=5
#
# Cross-validation: as an array job, task I trains fold I (data.fold=$SLURM_ARRAY_TASK_ID unless
# data.fold is given) into runs/<job name>/fold-I/; each task is preempted, requeued and resumed
# on its own like any job, and the last fold to finish writes runs/<job name>/cv/ (out-of-fold
# scores, the pooled threshold/post-processing choice). An array job needs data.folds=K.
#
# Each node runs one Slurm task; that task starts the node's trainer processes with
# `accelerate launch` (one process per GPU), or plain `python jobs/train.py` when the whole job
# is a single process. The run folder is $OUTPUT_ROOT/$RUN_NAME, keyed by the job NAME (-J), so
# a requeued or resubmitted job with the same name resumes the same run (train.resume=auto).
#
# Preemption and time limits: Slurm sends USR1 to this script 180 s before the time limit
# (`--signal=B:USR1@180` below), and so does `scancel --signal=USR1 --batch JOB`. The script passes
# the signal on to every trainer process; they finish the current step, save a state and exit
# with status 75 ("resume me"); the script then runs `scontrol requeue`, and the requeued job
# resumes from that state with the step count continuing. A step that exits 75 on its own
# (e.g. `--signal=USR1@…` without `B:`) is requeued the same way. Plain `scancel JOB` (SIGTERM)
# lets the trainers save but does not requeue: resubmit with the same -J to continue.
#
# Environment variables (set them on the sbatch command line: `VAR=value sbatch …`):
#   RUN_NAME                  run folder name (default: the job name, $SLURM_JOB_NAME)
#   OUTPUT_ROOT               where run folders go (default: <repo>/runs)
#   LESIONSEG_ROOT            the repository (default: the submit directory)
#   PYTHON                    the Python with lesionseg installed (default: $LESIONSEG_VENV/bin/python,
#                             else the active $VIRTUAL_ENV, else <repo>/.venv, else python3)
#   LESIONSEG_VENV            a virtual environment to take Python from
#   LESIONSEG_GPUS_PER_NODE   GPUs per node (default: what Slurm allocated, else nvidia-smi's count)
#   LESIONSEG_CPU             1 = train on CPUs even where GPUs exist (gloo backend)
#   LESIONSEG_PROCS_PER_NODE  trainer processes per node (default: GPUs per node; 1 on CPU)
#   LESIONSEG_MAX_REQUEUES    stop requeueing after this many restarts (default 20)
#   MAIN_PORT                 rendezvous port (default: 20000 + job id mod 20000)
#   OMP_NUM_THREADS           threads per process (default: CPUs per task / processes per node)
#   WANDB_MODE                overrides tracking.mode. The default, offline, suits compute nodes
#                             without internet: runs are written under <run folder>/wandb/ and
#                             uploaded later from a login node with
#                             `wandb sync <run folder>/wandb/offline-run-*` (each requeued segment
#                             is its own offline run in one W&B group; sync them all)
#
#SBATCH --job-name=lesionseg-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@180
#SBATCH --requeue

set -uo pipefail

EXIT_RESUME=75  # lesionseg.errors.EXIT_RESUME: the trainer saved a state and wants to be rerun
STOP_REQUESTED=0  # set by the USR1 trap: requeue once the step has ended
TERMINATING=0  # set by the TERM trap (scancel / hard time limit): never requeue then
STEP_PID=

# The comment block at the top of this file, as help text.
usage() {
  sed -n '2,/^#SBATCH/{/^#SBATCH/d;s/^# \{0,1\}//;p;}' "$0"
}

log() { echo "[slurm/train.sh $(date +%H:%M:%S)] $*" >&2; }
die() { echo "slurm/train.sh: error: $*" >&2; exit 2; }

# The repository: $LESIONSEG_ROOT, else the submit directory, else the folder above this script
# as Slurm recorded it (the running copy of a batch script lives in Slurm's spool folder).
find_root() {
  local dir
  for dir in "${LESIONSEG_ROOT:-}" "${SLURM_SUBMIT_DIR:-}" \
      "$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null \
         | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | xargs -r dirname 2>/dev/null)/.."; do
    if [ -n "$dir" ] && [ -f "$dir/jobs/train.py" ]; then
      (cd "$dir" && pwd)
      return 0
    fi
  done
  die "cannot find the lesionseg repository (jobs/train.py): submit from its root or set LESIONSEG_ROOT"
}

# The Python interpreter to run, checked to import lesionseg and accelerate.
find_python() {
  local py
  if [ -n "${PYTHON:-}" ]; then py=$PYTHON
  elif [ -n "${LESIONSEG_VENV:-}" ]; then py=$LESIONSEG_VENV/bin/python
  elif [ -n "${VIRTUAL_ENV:-}" ]; then py=$VIRTUAL_ENV/bin/python
  elif [ -x "$ROOT/.venv/bin/python" ]; then py=$ROOT/.venv/bin/python
  else py=python3
  fi
  "$py" -c "import lesionseg, accelerate" 2>/dev/null \
    || die "$py cannot import lesionseg and accelerate: set PYTHON or LESIONSEG_VENV"
  echo "$py"
}

# GPUs per node: the override, else Slurm's allocation ("a100:4" -> 4), else nvidia-smi's count.
gpus_per_node() {
  local n
  if [ -n "${LESIONSEG_GPUS_PER_NODE:-}" ]; then n=$LESIONSEG_GPUS_PER_NODE
  elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then n=$SLURM_GPUS_ON_NODE
  elif [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then n=${SLURM_GPUS_PER_NODE##*:}
  elif command -v nvidia-smi >/dev/null 2>&1; then n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  else n=0
  fi
  [[ "$n" =~ ^[0-9]+$ ]] || die "cannot read a GPU count from '$n' (set LESIONSEG_GPUS_PER_NODE)"
  echo "$n"
}

# Threads per trainer process: the task's CPUs shared by the node's $1 processes (at least 1).
threads_per_process() {
  local n=$(( ${SLURM_CPUS_PER_TASK:-1} / $1 ))
  echo $(( n > 0 ? n : 1 ))
}

# Whether one of the arguments after $1 sets config key $1 (`key=value`).
has_key() {
  local key=$1 arg
  shift
  for arg in "$@"; do
    [ "${arg%%=*}" = "$key" ] && return 0
  done
  return 1
}

# Runs on every node as its one Slurm task: starts this node's trainer processes.
# LAUNCH_MODE=single runs the trainer itself (its exit status, 75 included, is the task's);
# LAUNCH_MODE=multi runs `accelerate launch`, whose torchrun agent forwards USR1/TERM to the
# trainers (PET_SIGNALS_TO_HANDLE) but exits 1 whatever they return, so a stop signal followed
# by a failed launcher is reported as 75. SLURM_NODEID is read here, on the node (accelerate #2816).
# `--mixed_precision no` only silences a launcher warning: train.mixed_precision decides.
# shellcheck disable=SC2317  # called indirectly (srun bash -c / trap)
launch_on_node() {
  if [ "$LAUNCH_MODE" = single ]; then
    exec "$PYTHON" "$ROOT/jobs/train.py" "$@"
  fi
  local stopped=0 rc pid
  trap 'stopped=1' USR1 TERM
  "$PYTHON" -m accelerate.commands.launch \
    --multi_gpu \
    --num_machines "$SLURM_NNODES" \
    --machine_rank "$SLURM_NODEID" \
    --num_processes "$NUM_PROCESSES" \
    --main_process_ip "$MAIN_IP" \
    --main_process_port "$MAIN_PORT" \
    --mixed_precision no \
    --dynamo_backend no \
    "$ROOT/jobs/train.py" "$@" &
  pid=$!
  wait_for "$pid"
  rc=$?
  if [ "$rc" -ne 0 ] && [ "$stopped" = 1 ]; then
    rc=$EXIT_RESUME
  fi
  exit "$rc"
}

# Wait for background process $1 to end and return its status, also when a trapped signal
# interrupts `wait` (bash then returns 128+signal while the process still runs).
wait_for() {
  local rc again
  while :; do
    wait "$1"
    rc=$?
    kill -0 "$1" 2>/dev/null && continue
    wait "$1" 2>/dev/null
    again=$?
    [ "$again" -ne 127 ] && rc=$again  # the first wait was cut short; this is the real status
    return "$rc"
  done
}

# USR1 (time limit ahead, preemption, `scancel --signal=USR1 --batch`): pass it to the step.
# shellcheck disable=SC2317  # called indirectly (srun bash -c / trap)
on_usr1() {
  log "USR1: asking the trainers to save a state and stop"
  STOP_REQUESTED=1
  if [ -n "$STEP_PID" ]; then
    kill -USR1 "$STEP_PID" 2>/dev/null
  fi
}

# TERM (scancel, hard time limit): Slurm signals the step too; wait for it, never requeue.
# shellcheck disable=SC2317  # called indirectly (srun bash -c / trap)
on_term() {
  log "TERM: the job is ending; trainers save what they can, no requeue"
  TERMINATING=1
}

# Requeue this job when the step asked for it, within LESIONSEG_MAX_REQUEUES restarts.
maybe_requeue() {
  local rc=$1 restarts=${SLURM_RESTART_COUNT:-0}
  if [ "$TERMINATING" = 1 ]; then
    return "$rc"
  fi
  if [ "$rc" -ne "$EXIT_RESUME" ] && { [ "$STOP_REQUESTED" = 0 ] || [ "$rc" -eq 0 ]; }; then
    return "$rc"
  fi
  if [ "$restarts" -ge "${LESIONSEG_MAX_REQUEUES:-20}" ]; then
    log "not requeueing: $restarts restarts already (LESIONSEG_MAX_REQUEUES); resubmit with -J $RUN_NAME"
    return "$EXIT_RESUME"
  fi
  log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1))): the step ended with status $rc" \
      "$([ "$STOP_REQUESTED" = 1 ] && echo "after USR1")"
  scontrol requeue "$SLURM_JOB_ID" || { log "scontrol requeue failed"; return "$EXIT_RESUME"; }
  return 0
}

main() {
  case "${1:-}" in -h|--help) usage; exit 0 ;; esac
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    usage >&2
    die "run me with sbatch (usage above)"
  fi
  trap on_usr1 USR1
  trap on_term TERM

  ROOT=$(find_root) || exit 2
  PYTHON=$(find_python) || exit 2
  RUN_NAME=${RUN_NAME:-$SLURM_JOB_NAME}
  OUTPUT_ROOT=${OUTPUT_ROOT:-$ROOT/runs}
  local nnodes=${SLURM_NNODES:-1} gpus procs
  gpus=$(gpus_per_node) || exit 2
  if [ "${LESIONSEG_CPU:-0}" = 1 ] || [ "$gpus" = 0 ]; then
    export ACCELERATE_USE_CPU=true
    procs=${LESIONSEG_PROCS_PER_NODE:-1}
  else
    procs=${LESIONSEG_PROCS_PER_NODE:-$gpus}
  fi
  NUM_PROCESSES=$((nnodes * procs))
  MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  MAIN_PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  LAUNCH_MODE=multi
  [ "$NUM_PROCESSES" = 1 ] && LAUNCH_MODE=single
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(threads_per_process "$procs")}
  # torchrun's agent must pass USR1 on (it dies on it by default) and give a save time to finish.
  export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
  export ROOT PYTHON LAUNCH_MODE NUM_PROCESSES MAIN_IP MAIN_PORT EXIT_RESUME
  export -f launch_on_node wait_for

  log "job $SLURM_JOB_ID ($RUN_NAME) restart ${SLURM_RESTART_COUNT:-0}: $nnodes node(s) x $procs" \
      "process(es) = $NUM_PROCESSES, ${ACCELERATE_USE_CPU:+CPU, }launch $LAUNCH_MODE," \
      "head $MAIN_IP:$MAIN_PORT, run folder $OUTPUT_ROOT/$RUN_NAME, python $PYTHON"
  if [ "$STOP_REQUESTED" = 1 ]; then
    maybe_requeue "$EXIT_RESUME"
    exit $?
  fi
  local args=("$@")
  if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then  # an array job: one cross-validation fold per task
    has_key data.folds "$@" \
      || die "an array job trains cross-validation folds, one per task: pass data.folds=K (and --array=0-<K-1>)"
    has_key data.fold "$@" || args+=("data.fold=$SLURM_ARRAY_TASK_ID")
  fi
  has_key train.output_dir "$@" || args+=("train.output_dir=$OUTPUT_ROOT/$RUN_NAME")
  # A requeued job always resumes; a first start honours the user's train.resume.
  if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] || ! has_key train.resume "$@"; then
    args+=(train.resume=auto)
  fi
  log "command: jobs/train.py ${args[*]}"
  # No --kill-on-bad-exit: the first node to exit 75 after saving must not kill the others.
  srun --nodes="$nnodes" --ntasks-per-node=1 \
    bash -c 'launch_on_node "$@"' launch_on_node "${args[@]}" &
  STEP_PID=$!
  wait_for "$STEP_PID"
  local rc=$?
  log "training step ended with status $rc"
  maybe_requeue "$rc"
  exit $?
}

main "$@"
