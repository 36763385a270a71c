#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for tests/test_workflow_slurm.py (and by hand):
#
#   tests/slurm/up.sh          # install (first time, ~45 s of apt), configure, start, wait for the node
#   tests/slurm/up.sh stop     # stop the daemons it started
#
# Debian's packages (slurmctld, slurmd, slurmdbd, munge, MariaDB), started without systemd: munged,
# mariadbd, slurmdbd (accounting: the SLURM executor plugin reads job states with sacct), slurmctld and
# slurmd, each in the background. The node is this host (`hostname -s`) with its real CPUs and memory and
# one fake GPU (gres gpu:1 backed by /dev/null), so the GPU submission path is exercised without a GPU.
# Safe to run twice: what is already running or configured is left alone. As root.
#
# On failure: one line naming the daemon or command, then the tail of its log.
set -euo pipefail

CLUSTER=sarm              # ClusterName
ACCOUNT=sarm              # the account root's jobs are charged to (tests/test_workflow_slurm.py passes it)
PARTITION=debug           # the one partition
DB_PASS=sarm-local-only   # MariaDB password of the slurm accounting user (local socket, this machine only)
NODE=$(hostname -s)
LOGS=/var/log/slurm
CONF=/etc/slurm

fail() {  # fail <what failed> [log file]
    echo "tests/slurm/up.sh: $1" >&2
    if [ -n "${2:-}" ] && [ -f "$2" ]; then
        echo "--- last lines of $2:" >&2
        tail -n 20 "$2" >&2
    fi
    exit 1
}

running() { pgrep -x "$1" >/dev/null; }

stop() {
    for d in slurmd slurmctld slurmdbd; do
        if [ -f "/run/slurm/$d.pid" ]; then kill "$(cat /run/slurm/$d.pid)" 2>/dev/null || true; fi
    done
    if [ -f /run/mysqld/mysqld.pid ]; then kill "$(cat /run/mysqld/mysqld.pid)" 2>/dev/null || true; fi
    if [ -f /run/munge/munged.pid ]; then kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true; fi
    echo "tests/slurm/up.sh: daemons stopped"
}

if [ "${1:-}" = stop ]; then stop; exit 0; fi
[ "$(id -u)" -eq 0 ] || fail "run as root (it installs packages and starts daemons)"

# --- packages ---
PACKAGES="slurmctld slurmd slurm-client slurmdbd munge mariadb-server procps"  # procps: pgrep
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "tests/slurm/up.sh: installing$missing"
    apt-get update -qq || fail "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 $missing >/tmp/slurm-apt.log 2>&1 \
        || fail "apt-get install$missing failed" /tmp/slurm-apt.log
fi

# --- run-time folders (no systemd to create them) ---
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
install -d -o mysql -g mysql -m 0755 /run/mysqld /var/log/mysql
install -d -m 0755 /run/slurm "$LOGS" "$CONF" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd

# --- configuration (rewritten each time: it depends only on this host) ---
# CPUs, sockets and memory as slurmd sees them; a little memory is left to the OS.
hw=$(slurmd -C | head -n 1) || fail "slurmd -C (reading this host's CPUs and memory) failed"
field() { echo "$hw" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
mem=$(( $(field RealMemory) * 9 / 10 ))
cat >"$CONF/slurm.conf" <<EOF
# Written by tests/slurm/up.sh: a one-node cluster on $NODE.
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# no cgroups here: track processes by their parent, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=2
# a job over its memory is killed (there is no cgroup to do it): OUT_OF_MEMORY in sacct
JobAcctGatherParams=OverMemoryKill
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
KillWait=5
MinJobAge=300
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageEnforce=associations
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
NodeName=$NODE CPUs=$(field CPUs) Boards=$(field Boards) SocketsPerBoard=$(field SocketsPerBoard) CoresPerSocket=$(field CoresPerSocket) ThreadsPerCore=$(field ThreadsPerCore) RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
cat >"$CONF/gres.conf" <<EOF
# A fake GPU: lets jobs that ask for one (--gpus=1) be scheduled on a machine without GPUs.
NodeName=$NODE Name=gpu Count=1 File=/dev/null
EOF
cat >"$CONF/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=/run/slurm/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
chown root:root "$CONF/slurmdbd.conf"
chmod 0600 "$CONF/slurmdbd.conf"  # slurmdbd refuses a readable one

# --- munge ---
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
if ! running munged; then
    runuser -u munge -- /usr/sbin/munged || fail "munged did not start" /var/log/munge/munged.log
fi
for _ in $(seq 20); do munge -n >/dev/null 2>&1 && break; sleep 0.5; done
munge -n | unmunge >/dev/null 2>&1 || fail "munge -n | unmunge failed: munged is not answering" /var/log/munge/munged.log

# --- MariaDB and the accounting database ---
if [ ! -d /var/lib/mysql/mysql ]; then
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/tmp/slurm-mariadb-install.log 2>&1 \
        || fail "mariadb-install-db failed" /tmp/slurm-mariadb-install.log
fi
if ! running mariadbd; then
    (setsid mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid --log-error=/var/log/mysql/error.log \
        >/dev/null 2>&1 &)
fi
for _ in $(seq 60); do mariadb-admin ping >/dev/null 2>&1 && break; sleep 0.5; done
mariadb-admin ping >/dev/null 2>&1 || fail "mariadbd is not answering (mariadb-admin ping)" /var/log/mysql/error.log
mariadb <<EOF || fail "creating the accounting database in MariaDB failed (mariadb)"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF

# --- slurmdbd, slurmctld, slurmd ---
start() {  # start <daemon>: in the background, unless running; fail with its log when it does not stay up
    local d=$1
    running "$d" && return 0
    "/usr/sbin/$d" >>"$LOGS/$d.out" 2>&1 || fail "$d did not start (/usr/sbin/$d)" "$LOGS/$d.log"
    sleep 1
    running "$d" || fail "$d exited just after starting" "$LOGS/$d.log"
}
start slurmdbd
for _ in $(seq 30); do sacctmgr -n -i show cluster >/dev/null 2>&1 && break; sleep 0.5; done
sacctmgr -n -i show cluster >/dev/null 2>&1 || fail "slurmdbd is not answering (sacctmgr show cluster)" "$LOGS/slurmdbd.log"
if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail "sacctmgr add cluster $CLUSTER failed" "$LOGS/slurmdbd.log"
fi
if ! sacctmgr -n -P show account format=account | grep -qx "$ACCOUNT"; then
    sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="sarm tests" organization=sarm >/dev/null \
        || fail "sacctmgr add account $ACCOUNT failed" "$LOGS/slurmdbd.log"
fi
if ! sacctmgr -n -P show assoc where user=root account="$ACCOUNT" format=user | grep -qx root; then
    sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null \
        || fail "sacctmgr add user root account=$ACCOUNT failed" "$LOGS/slurmdbd.log"
fi

if running slurmctld; then
    scontrol reconfigure >/dev/null 2>&1 || true  # picks up a rewritten slurm.conf
fi
start slurmctld
start slurmd
for _ in $(seq 60); do
    state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n 1)
    case "$state" in idle|mix|alloc) break ;; esac
    sleep 0.5
done
case "${state:-}" in
    idle|mix|alloc) ;;
    *) sinfo -h -n "$NODE" -o %t >/dev/null 2>&1 || fail "sinfo cannot reach slurmctld" "$LOGS/slurmctld.log"
       fail "node $NODE is '${state:-unknown}', not idle, after 30 s (sinfo -n $NODE; scontrol show node $NODE says: $(scontrol show node "$NODE" | grep -o 'Reason=.*'))" "$LOGS/slurmd.log" ;;
esac
sacct -n -X -S now >/dev/null 2>&1 || fail "sacct cannot read accounting from slurmdbd" "$LOGS/slurmdbd.log"
echo "tests/slurm/up.sh: cluster $CLUSTER up: node $NODE $state ($(field CPUs) CPUs, ${mem} MB, gres gpu:1), partition $PARTITION, account $ACCOUNT"
