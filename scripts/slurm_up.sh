#!/usr/bin/env bash
# Start a real single-node SLURM (munge + slurmctld + slurmd) for the sbatch tests. Idempotent.
# Installs Debian's slurm-wlm packages when missing (needs root and apt). There is no systemd on these machines:
# the daemons are started by hand and their PIDs recorded, so scripts/slurm_down.sh stops exactly them.
set -euo pipefail
STATE=/run/spark-slurm
if [[ $(id -u) -ne 0 ]]; then echo "slurm_up: not root, skipping (sbatch tests will be skipped)"; exit 0; fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "slurm_up: installing slurm-wlm and munge from Debian"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client \
    munge >/dev/null
fi
mkdir -p "$STATE" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/run/slurm
chown munge:munge /run/munge 2>/dev/null || true
if [[ -f $STATE/slurmd.pid ]] && kill -0 "$(cat $STATE/slurmd.pid)" 2>/dev/null; then
  echo "slurm_up: already running"; exit 0
fi
HOST=$(hostname)
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=spark-ci
SlurmctldHost=$HOST
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SlurmUser=root
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=30
KillWait=60
NodeName=$HOST CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
/usr/sbin/munged --force 2>/dev/null
cp /run/munge/munged.pid "$STATE/munged.pid" 2>/dev/null || true
/usr/sbin/slurmctld
/usr/sbin/slurmd
for _ in $(seq 1 30); do
  if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then echo "slurm_up: node $HOST ready"; exit 0; fi
  sleep 0.5
done
echo "slurm_up: node did not become idle; see /var/log/slurm/*.log" >&2
exit 1
