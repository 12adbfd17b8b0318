#!/usr/bin/env bash
# A one-node SLURM cluster for the tests (Debian's slurmctld, slurmd and munge; no systemd).
#
#   tests/slurm/cluster.sh start BASE [CTLD_PORT SLURMD_PORT]   # install when root, configure under BASE, start
#   tests/slurm/cluster.sh stop BASE                             # cancel every job, stop what start started
#   tests/slurm/cluster.sh install                               # only the Debian packages (for .ci/run)
#
# Clients need  export SLURM_CONF=BASE/etc/slurm.conf  (start prints it as its last line).
# Exit status of start: 0 running; 3 cannot start here (the reason is the last line: not root,
# no apt-get, a port in use, ...); anything else is a failure, with the daemons' logs printed.
# Daemons are stopped by the PIDs this script recorded, never by name.
set -Eeuo pipefail

cmd=${1:-}
BASE=${2:-}
CTLD_PORT=${3:-6817}
SLURMD_PORT=${4:-6818}
PACKAGES="slurmctld slurmd slurm-client munge"

cannot() { echo "cannot start SLURM here: $*"; exit 3; }
wait_for() {  # wait_for SECONDS CMD...: poll every 0.1 s until CMD succeeds
    local n=$(($1 * 10)); shift
    until "$@" >/dev/null 2>&1; do n=$((n - 1)); [ "$n" -gt 0 ] || return 1; sleep 0.1; done
}
munge_ok() { munge -n | unmunge; }
ctld_up() { scontrol ping | grep -q 'is UP'; }
node_idle() { sinfo -h -o %T | grep -qx idle; }
queue_empty() { [ -z "$(squeue -h 2>/dev/null)" ]; }
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
have_all() { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; }

install_packages() {
    have_all >/dev/null && return 0
    [ "$(id -u)" = 0 ] || cannot "SLURM is not installed and this is not root (apt-get install $PACKAGES)"
    command -v apt-get >/dev/null || cannot "SLURM is not installed and there is no apt-get"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $PACKAGES >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $PACKAGES >/dev/null; } \
        || cannot "apt-get install $PACKAGES failed"
    have_all >/dev/null || cannot "the packages $PACKAGES do not provide slurmctld, slurmd, sbatch and munged"
}

start() {
    [ -n "$BASE" ] || { echo "usage: $0 start BASE [CTLD_PORT SLURMD_PORT]" >&2; exit 2; }
    [ "$(id -u)" = 0 ] || cannot "slurmd must run as root"
    install_packages
    port_free "$CTLD_PORT" || cannot "port $CTLD_PORT is in use"
    port_free "$SLURMD_PORT" || cannot "port $SLURMD_PORT is in use"
    export SLURM_CONF=$BASE/etc/slurm.conf
    trap 'echo "SLURM start failed at line $LINENO"; tail -n 20 "$BASE"/log/*.log 2>/dev/null; stop' ERR
    local host mem cpus
    host=$(hostname -s)
    mem=$(awk '/MemAvailable/{print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cpus=$(nproc)
    mkdir -p "$BASE"/{etc,state,spool/slurmd,log,run,jobs}
    cat >"$SLURM_CONF" <<CONF
ClusterName=wsitest
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/slurmd
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    if ! munge_ok >/dev/null 2>&1; then  # a munged already running is not ours: it is left alone
        install -d -o munge -g munge -m 0755 /run/munge
        runuser -u munge -- /usr/sbin/munged
        wait_for 10 munge_ok
        cp /run/munge/munged.pid "$BASE/run/munged.pid"
    fi
    slurmctld -c
    wait_for 30 ctld_up
    slurmd
    wait_for 60 node_idle
    trap - ERR
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
    [ -n "$BASE" ] || { echo "usage: $0 stop BASE" >&2; exit 2; }
    export SLURM_CONF=$BASE/etc/slurm.conf
    [ -f "$SLURM_CONF" ] || return 0
    if ctld_up 2>/dev/null; then
        scancel --full --user="$(id -un)" 2>/dev/null || true
        wait_for 30 queue_empty || echo "warning: jobs still in the queue"
    fi
    local name pid
    for name in slurmd slurmctld munged; do  # the reverse of the start order
        [ -s "$BASE/run/$name.pid" ] || continue
        pid=$(cat "$BASE/run/$name.pid")
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || continue  # a stale file, or a reused pid
        kill -TERM "$pid" 2>/dev/null || continue
        wait_for 30 sh -c "! kill -0 $pid" || kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$BASE"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    install) install_packages ;;
    *) echo "usage: $0 start BASE [CTLD_PORT SLURMD_PORT] | stop BASE | install" >&2; exit 2 ;;
esac
