#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for the `slurm`-marked tests and for trying
# slurm/train.sh and slurm/infer.sh by hand.
#
#   bash tests/slurm/local-slurm.sh start    # install (Debian packages) if missing, configure, start
#   bash tests/slurm/local-slurm.sh status   # daemons and node state; exit 0 only when usable
#   bash tests/slurm/local-slurm.sh stop     # cancel jobs, stop the daemons this script started
#
# What `start` does, in order:
#   1. installs slurmctld, slurmd, slurm-client and munge with apt-get when a command is missing
#      (non-interactive; needs root, which CI and the dev machines have);
#   2. writes /etc/slurm/slurm.conf for this host: NodeName=$(hostname -s), CPUs=$(nproc),
#      RealMemory = 90% of available memory, one default partition, no accounting, no cgroups,
#      root jobs allowed; every state, spool, pid and log file lives under $LESIONSEG_SLURM_DIR;
#   3. starts munged (as user munge), slurmctld and slurmd, and waits until `sinfo` shows the
#      node idle (bounded: $LESIONSEG_SLURM_WAIT seconds).
# It is idempotent: `start` on a running cluster only checks it. It never overwrites a
# slurm.conf it did not write (set LESIONSEG_SLURM_FORCE=1 to allow that).
#
# Environment:
#   LESIONSEG_SLURM_DIR    state/spool/pid/log folder (default /tmp/lesionseg-slurm)
#   LESIONSEG_SLURM_WAIT   seconds to wait for the node to become idle (default 60)
#   LESIONSEG_SLURM_FORCE  1 = replace an /etc/slurm/slurm.conf this script did not write
set -euo pipefail

BASE=${LESIONSEG_SLURM_DIR:-/tmp/lesionseg-slurm}
WAIT_S=${LESIONSEG_SLURM_WAIT:-60}
CONF=/etc/slurm/slurm.conf
MARKER="# written by lesionseg tests/slurm/local-slurm.sh"
HOST=$(hostname -s)
MUNGE_PID=/run/munge/munged.pid

log() { echo "local-slurm: $*" >&2; }
die() { echo "local-slurm: error: $*" >&2; exit 1; }

# True when the pid in file $1 names a live process.
pid_alive() {
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# Install the Debian packages when any of the commands is missing.
install_packages() {
  local missing=0 cmd
  for cmd in slurmctld slurmd sinfo sbatch munged munge; do
    command -v "$cmd" >/dev/null 2>&1 || missing=1
  done
  [ "$missing" = 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "Slurm is not installed and installing it needs root"
  command -v apt-get >/dev/null 2>&1 || die "Slurm is not installed and apt-get is not available"
  log "installing slurmctld slurmd slurm-client munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq </dev/null >"$BASE/apt.log" 2>&1 \
    || die "apt-get update failed; see $BASE/apt.log"
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
    </dev/null >>"$BASE/apt.log" 2>&1 \
    || die "apt-get install of Slurm failed; see $BASE/apt.log"
}

# Start munged as its own user unless one already answers; remember whether we started it.
start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null 2>&1; then
      mungekey --create --keyfile=/etc/munge/munge.key
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  su -s /bin/sh munge -c munged || die "munged did not start; see /var/log/munge/munged.log"
  touch "$BASE/munged.ours"
  local _
  for _ in $(seq 1 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged started but 'munge -n | unmunge' fails; see /var/log/munge/munged.log"
}

# Memory Slurm may hand out: 90% of what is available now, in MiB.
real_memory_mb() {
  awk '/^MemAvailable:/ { printf "%d\n", $2 / 1024 * 0.9 }' /proc/meminfo
}

# Write slurm.conf for this host (refusing to replace a foreign one).
write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF" && [ "${LESIONSEG_SLURM_FORCE:-0}" != 1 ]; then
    die "$CONF exists and was not written by this script; set LESIONSEG_SLURM_FORCE=1 to replace it"
  fi
  mkdir -p /etc/slurm "$BASE/state" "$BASE/spool" "$BASE/log"
  # cgroup.conf must not exist: `CgroupPlugin=disabled` makes slurmd 22.05 fail to start.
  if [ -f /etc/slurm/cgroup.conf ] && grep -qF "$MARKER" /etc/slurm/cgroup.conf; then
    rm -f /etc/slurm/cgroup.conf
  fi
  cat >"$CONF.tmp" <<EOF
$MARKER
# One node ($HOST), no accounting, no cgroups; jobs may run as root.
ClusterName=lesionseg
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
DisableRootJobs=NO
MailProg=/bin/true
MinJobAge=600
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$(real_memory_mb) State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
}

# The node's state as sinfo reports it (idle, mix, alloc, down*, drain, …) or empty.
node_state() {
  timeout 10 sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n 1 || true
}

# Wait until the node can take jobs; resume it once if it came up down or drained.
wait_idle() {
  local deadline=$((SECONDS + WAIT_S)) state resumed=0
  while [ "$SECONDS" -lt "$deadline" ]; do
    state=$(node_state)
    case "$state" in
      idle|mix|alloc|comp) log "node $HOST is $state"; return 0 ;;
      down*|drain*|drng*|fail*)
        if [ "$resumed" = 0 ]; then
          scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
          resumed=1
        fi ;;
    esac
    sleep 1
  done
  log "node $HOST did not become idle within ${WAIT_S}s (state: '${state:-no answer}')"
  tail -n 15 "$BASE/log/slurmctld.log" "$BASE/log/slurmd.log" >&2 2>/dev/null || true
  die "cluster not usable; logs in $BASE/log"
}

do_start() {
  mkdir -p "$BASE"
  install_packages
  if pid_alive "$BASE/slurmctld.pid" && pid_alive "$BASE/slurmd.pid"; then
    log "already running"
    wait_idle
    return 0
  fi
  start_munge
  write_conf
  if ! pid_alive "$BASE/slurmctld.pid"; then
    # -c: a cold start without jobs from an earlier session (their processes are gone).
    slurmctld -c || die "slurmctld did not start; see $BASE/log/slurmctld.log"
  fi
  if ! pid_alive "$BASE/slurmd.pid"; then
    slurmd || die "slurmd did not start; see $BASE/log/slurmd.log"
  fi
  wait_idle
}

# Send TERM to the daemon in pid file $1, then KILL if it has not gone after 10 s.
stop_pidfile() {
  local file=$1 pid
  pid_alive "$file" || { rm -f "$file"; return 0; }
  pid=$(cat "$file")
  kill "$pid" 2>/dev/null || true
  local _
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

# Cancel every job so no job step outlives the daemons, waiting a bounded time for them to end.
cancel_jobs() {
  pid_alive "$BASE/slurmctld.pid" || return 0
  timeout 10 scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
  local _
  for _ in $(seq 1 40); do
    [ -z "$(timeout 10 squeue -h -o %i 2>/dev/null)" ] && return 0
    sleep 1
  done
  log "some jobs were still ending after 40 s"
}

do_stop() {
  cancel_jobs
  stop_pidfile "$BASE/slurmd.pid"
  stop_pidfile "$BASE/slurmctld.pid"
  if [ -f "$BASE/munged.ours" ]; then
    stop_pidfile "$MUNGE_PID"
    rm -f "$BASE/munged.ours"
  fi
  log "stopped"
}

do_status() {
  local ok=0
  local daemon
  for daemon in slurmctld slurmd; do
    if pid_alive "$BASE/$daemon.pid"; then
      log "$daemon running (pid $(cat "$BASE/$daemon.pid"))"
    else
      log "$daemon not running"
      ok=1
    fi
  done
  local state
  state=$(node_state)
  log "node $HOST: ${state:-no answer}"
  case "$state" in idle|mix|alloc|comp) ;; *) ok=1 ;; esac
  return "$ok"
}

case "${1:-}" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
