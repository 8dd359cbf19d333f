#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the `cluster` test group:
#   bash scripts/local_slurm.sh install   # Debian's slurm-wlm + munge (needs apt-get and root)
#   bash scripts/local_slurm.sh start     # munged + slurmctld + slurmd, waits until the node is idle
#   bash scripts/local_slurm.sh stop      # stops the daemons it started, by their pids
# The state lives in $LAMDA_SLURM_DIR (default /tmp/lamda-repro-slurm): state, spool, logs
# (slurmctld.log holds every submitted job id) and pid files. The config goes to SLURM's default
# path, /etc/slurm/slurm.conf, because the SLURM executor plugin clears every SLURM_* variable
# (SLURM_CONF included) inside jobs before calling srun; the script refuses to replace a config it
# did not write, and `stop` removes its own. No accounting daemon: the test profile asks squeue
# for job states. Every wait is bounded.
set -euo pipefail
DIR="${LAMDA_SLURM_DIR:-/tmp/lamda-repro-slurm}"
CONF=/etc/slurm/slurm.conf
OURS="# written by lamda-repro scripts/local_slurm.sh"
HOST="$(hostname -s)"

die() { echo "local_slurm: $*" >&2; exit 1; }

wait_for() {  # wait_for <seconds> <command...>: poll every 0.5 s, fail after <seconds>
  local limit=$1; shift
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || return 1
    sleep 0.5
  done
}

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || die "cannot install SLURM: no apt-get"
  [ "$(id -u)" = 0 ] || die "cannot install SLURM: apt-get needs root"
  timeout -k 10 240 apt-get install -y --no-install-recommends slurm-wlm munge >"$DIR.apt.log" 2>&1 \
    || { timeout -k 10 120 apt-get update >>"$DIR.apt.log" 2>&1 \
         && timeout -k 10 240 apt-get install -y --no-install-recommends slurm-wlm munge >>"$DIR.apt.log" 2>&1; } \
    || die "cannot install SLURM: apt-get failed (see $DIR.apt.log)"
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
  getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >>/etc/hosts
  # The node as slurmd sees it, with 90% of its memory schedulable.
  local node mem
  node="$(slurmd -C | head -1)"
  mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")"
  node="$(sed "s/RealMemory=[0-9]*/RealMemory=$((mem * 9 / 10))/" <<<"$node")"
  if [ -e "$CONF" ] && ! head -1 "$CONF" | grep -qxF "$OURS"; then
    die "cannot start a test cluster: $CONF exists and was not written by this script"
  fi
  mkdir -p "$(dirname "$CONF")"
  cat >"$CONF" <<EOF
$OURS
ClusterName=lamdarepro
SlurmctldHost=$HOST
SlurmctldPort=${LAMDA_SLURMCTLD_PORT:-6817}
SlurmdPort=${LAMDA_SLURMD_PORT:-6818}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=300
KillWait=10
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
$node State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start() {
  install
  mkdir -p "$DIR"
  write_conf
  if ! munge_ok; then
    # munged runs as its own user and checks the permissions of its paths: keep its defaults
    # (/run/munge, /var/log/munge) and remember its pid as the one this script started.
    mkdir -p /run/munge /var/log/munge && chown munge:munge /run/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
    wait_for 20 munge_ok || die "munge does not answer after 20 s"
    cp /run/munge/munged.pid "$DIR/run/munged.pid"
  fi
  /usr/sbin/slurmctld -f "$CONF" || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
  wait_for 30 scontrol ping || die "slurmctld does not answer after 30 s (see $DIR/log/slurmctld.log)"
  /usr/sbin/slurmd -f "$CONF" || die "slurmd did not start (see $DIR/log/slurmd.log)"
  idle() { sinfo -h -o %T | grep -qx idle; }
  wait_for 60 idle || die "node not idle after 60 s: $(sinfo -h -o '%T %E' 2>&1 | head -1)"
  echo "local_slurm: up ($CONF, state in $DIR)"
}

stop_pid() {  # stop_pid <pid file> <name>: SIGTERM, wait up to 20 s, then SIGKILL
  local file=$1 pid
  [ -s "$file" ] || return 0
  pid="$(cat "$file")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    wait_for 20 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

stop() {
  stop_pid "$DIR/run/slurmd.pid"
  stop_pid "$DIR/run/slurmctld.pid"
  stop_pid "$DIR/run/munged.pid"  # only when this script started it
  if [ -e "$CONF" ] && head -1 "$CONF" | grep -qxF "$OURS"; then rm -f "$CONF"; fi
  echo "local_slurm: stopped"
}

case "${1:-}" in
  install) mkdir -p "$(dirname "$DIR")"; install ;;
  start) start ;;
  stop) stop ;;
  *) die "usage: $0 install|start|stop" ;;
esac
