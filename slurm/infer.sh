#!/usr/bin/env bash
# Batch inference as a Slurm array: each array task segments its share of the inputs, and a
# merge job writes metrics.csv, errors.csv, summary.json and report.html once all have succeeded.
#
# Submit both with one command (from the repository root, outside a job):
#   bash slurm/infer.sh --submit N [sbatch options …] -- --checkpoint FILE --input PATH … --out DIR
# e.g.
#   bash slurm/infer.sh --submit 8 --partition=gpu -- \
#       --checkpoint runs/isic-b16/best.pt --input ISIC2016_Test_Data.zip \
#       --masks ISIC2016_Test_GroundTruth.zip --out out/isic-test
# It prints the array job id and the merge job id. The same by hand:
#   A=$(sbatch --parsable --array=0-7 slurm/infer.sh --checkpoint … --input … --out out/x)
#   sbatch --dependency=afterok:$A --kill-on-invalid-dep=yes --gpus=0 slurm/infer.sh --merge out/x
#
# As a batch script:
#   sbatch --array=0-(N-1) slurm/infer.sh [jobs/infer.py options …]   # task I runs part I of N
#   sbatch slurm/infer.sh --merge DIR                                  # merge the parts in DIR
# Use a contiguous array (0-7, 0-7%2 or 0-14:2); part = (task id - first id) / step. Every
# option of `python jobs/infer.py --help` passes through. A failed or killed task is safe to
# rerun with the same arguments (`scontrol requeue JOB_TASK` or resubmit that task id): finished
# images are skipped. The last task to finish usually merges already; the merge job makes
# sure the outputs are written once the whole array has succeeded (also when tasks finish at
# the same moment), and is cancelled when a task fails (`--kill-on-invalid-dep=yes`).
#
# Environment variables (set on the sbatch / --submit command line):
#   LESIONSEG_ROOT   the repository (default: the submit directory)
#   PYTHON           the Python with lesionseg installed (default: $LESIONSEG_VENV/bin/python,
#                    else the active $VIRTUAL_ENV, else <repo>/.venv, else python3)
#   LESIONSEG_VENV   a virtual environment to take Python from
#   LESIONSEG_MERGE_SBATCH_ARGS  extra sbatch options for the merge job (--submit mode)
#   OMP_NUM_THREADS  threads per task (default: CPUs per task)
#
#SBATCH --job-name=lesionseg-infer
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --error=logs/%x-%A_%a.err
#SBATCH --open-mode=append

set -uo pipefail

# The comment block at the top of this file, as help text.
usage() {
  sed -n '2,/^#SBATCH/{/^#SBATCH/d;s/^# \{0,1\}//;p;}' "$0"
}

log() { echo "[slurm/infer.sh $(date +%H:%M:%S)] $*" >&2; }
die() { echo "slurm/infer.sh: error: $*" >&2; exit 2; }

# The repository: $LESIONSEG_ROOT, else the submit directory, else the folder above this script
# as Slurm recorded it (the running copy of a batch script lives in Slurm's spool folder).
find_root() {
  local dir
  for dir in "${LESIONSEG_ROOT:-}" "${SLURM_SUBMIT_DIR:-}" "$(dirname "${BASH_SOURCE[0]}")/.." \
      "$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null \
         | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | xargs -r dirname 2>/dev/null)/.."; do
    if [ -n "$dir" ] && [ -f "$dir/jobs/infer.py" ]; then
      (cd "$dir" && pwd)
      return 0
    fi
  done
  die "cannot find the lesionseg repository (jobs/infer.py): submit from its root or set LESIONSEG_ROOT"
}

# The Python interpreter to run, checked to import lesionseg.
find_python() {
  local py
  if [ -n "${PYTHON:-}" ]; then py=$PYTHON
  elif [ -n "${LESIONSEG_VENV:-}" ]; then py=$LESIONSEG_VENV/bin/python
  elif [ -n "${VIRTUAL_ENV:-}" ]; then py=$VIRTUAL_ENV/bin/python
  elif [ -x "$ROOT/.venv/bin/python" ]; then py=$ROOT/.venv/bin/python
  else py=python3
  fi
  "$py" -c "import lesionseg" 2>/dev/null \
    || die "$py cannot import lesionseg: set PYTHON or LESIONSEG_VENV"
  echo "$py"
}

# The value of option $1 (`--out DIR` or `--out=DIR`) among the remaining arguments, or empty.
option_value() {
  local name=$1
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      "$name") echo "${2:-}"; return 0 ;;
      "$name"=*) echo "${1#*=}"; return 0 ;;
    esac
    shift
  done
  return 1
}

# --submit N [sbatch options] -- [infer options]: the array job, then the merge job after it.
submit() {
  local n=${1:-}
  shift || true
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "--submit needs the number of array tasks (N >= 1), got '$n'"
  local sbatch_opts=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do
    sbatch_opts+=("$1")
    shift
  done
  [ "${1:-}" = -- ] || die "--submit N [sbatch options] -- [jobs/infer.py options]: missing '--'"
  shift
  local out script array_id merge_id
  out=$(option_value --out "$@")
  [ -n "$out" ] || die "missing --out DIR in the jobs/infer.py options"
  script=$ROOT/slurm/infer.sh
  export LESIONSEG_ROOT=$ROOT  # the jobs run in this directory; relative paths stay valid
  mkdir -p logs
  array_id=$(sbatch --parsable --array="0-$((n - 1))" "${sbatch_opts[@]}" "$script" "$@") \
    || die "sbatch of the array job failed"
  array_id=${array_id%%;*}
  # shellcheck disable=SC2086  # LESIONSEG_MERGE_SBATCH_ARGS is a list of options
  merge_id=$(sbatch --parsable "${sbatch_opts[@]}" --job-name=lesionseg-merge \
      --gpus=0 --cpus-per-task=1 --time=00:30:00 --output=logs/%x-%j.out --error=logs/%x-%j.err \
      --dependency="afterok:$array_id" --kill-on-invalid-dep=yes \
      ${LESIONSEG_MERGE_SBATCH_ARGS:-} "$script" --merge "$out") \
    || die "sbatch of the merge job failed (array job $array_id is queued; merge by hand with" \
           "jobs/infer.py --merge $out)"
  merge_id=${merge_id%%;*}
  log "array job $array_id ($n tasks), merge job $merge_id -> $out"
  echo "$array_id $merge_id"
}

# One array task (or a plain job): this part of the inputs, or the merge with --merge.
run_task() {
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  if [ "${1:-}" = --merge ]; then
    log "job ${SLURM_JOB_ID:-?}: merging ${2:-?}"
    exec "$PYTHON" "$ROOT/jobs/infer.py" "$@"
  fi
  local args=("$@")
  if [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && ! option_value --num-shards "$@" >/dev/null; then
    local count=${SLURM_ARRAY_TASK_COUNT:-1} first=${SLURM_ARRAY_TASK_MIN:-0}
    local step=${SLURM_ARRAY_TASK_STEP:-1}
    local index=$(( (SLURM_ARRAY_TASK_ID - first) / ${step:-1} ))
    if [ "$index" -lt 0 ] || [ "$index" -ge "$count" ]; then
      die "array task $SLURM_ARRAY_TASK_ID is not part 0..$((count - 1)); use a contiguous --array"
    fi
    args+=(--num-shards "$count" --shard-index "$index")
  fi
  log "job ${SLURM_JOB_ID:-?} task ${SLURM_ARRAY_TASK_ID:--}: jobs/infer.py ${args[*]}"
  exec "$PYTHON" "$ROOT/jobs/infer.py" "${args[@]}"
}

main() {
  case "${1:-}" in -h|--help) usage; exit 0 ;; esac
  ROOT=$(find_root) || exit 2
  if [ "${1:-}" = --submit ]; then
    shift
    submit "$@"
    return
  fi
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    usage >&2
    die "run me with sbatch, or with --submit N (usage above)"
  fi
  PYTHON=$(find_python) || exit 2
  run_task "$@"
}

main "$@"
