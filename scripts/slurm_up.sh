#!/usr/bin/env bash
# Start a real SLURM for the sbatch tests (munge + slurmctld + three slurmd). Idempotent.
# Partition `debug` (default): this machine as one node. Partition `multi`: two nodes, spark-n1 and spark-n2, each a
# slurmd in its own network namespace (own address on a private bridge, 10.77.0.0/24) and its own hostname (UTS
# namespace), so that multi-node jobs really rendezvous over addresses, resolve host lists and run per-node ranks.
# They share this machine's filesystem, as cluster nodes share a checkpoint directory.
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
if [[ -f $STATE/slurmd-$(hostname).pid ]] && kill -0 "$(cat "$STATE/slurmd-$(hostname).pid")" 2>/dev/null; then
  echo "slurm_up: already running"; exit 0
fi
HOST=$(hostname)
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
# the two-node partition's network: a bridge here (slurmctld's address) and one namespace per node
BRIDGE_IP=10.77.0.254
MULTI=1
net_up() {
  bash "$(dirname "$0")/slurm_down.sh" --net-only
  ip link add spkbr0 type bridge && ip addr add $BRIDGE_IP/24 dev spkbr0 && ip link set spkbr0 up || return 1
  for i in 1 2; do
    ip netns add spark-n$i && ip link add spkn${i}h type veth peer name spkn${i}c && ip link set spkn${i}c netns spark-n$i \
      && ip link set spkn${i}h master spkbr0 && ip link set spkn${i}h up \
      && ip netns exec spark-n$i ip addr add 10.77.0.$i/24 dev spkn${i}c \
      && ip netns exec spark-n$i ip link set spkn${i}c up && ip netns exec spark-n$i ip link set lo up || return 1
    echo "10.77.0.$i spark-n$i # spark-slurm" >> /etc/hosts
  done
}
net_up 2>/dev/null || { MULTI=0; echo "slurm_up: no network namespaces here: the two-node partition is left out"; }
CTLD_HOST=$HOST
(( MULTI )) && CTLD_HOST="$HOST($BRIDGE_IP)"
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=spark-ci
SlurmctldHost=$CTLD_HOST
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SlurmUser=root
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
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
if (( MULTI )); then
  cat >> /etc/slurm/slurm.conf <<CONF
NodeName=spark-n[1-2] NodeAddr=10.77.0.[1-2] CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM State=UNKNOWN
PartitionName=multi Nodes=spark-n[1-2] MaxTime=INFINITE State=UP
CONF
fi
/usr/sbin/munged --force 2>/dev/null
cp /run/munge/munged.pid "$STATE/munged.pid" 2>/dev/null || true
/usr/sbin/slurmctld
/usr/sbin/slurmd
if (( MULTI )); then
  for i in 1 2; do
    mkdir -p /var/spool/slurmd/spark-n$i
    # nsenter, not `ip netns exec`: that remounts /sys, and slurmd needs the cgroup filesystem under it
    nsenter --net=/run/netns/spark-n$i unshare --uts sh -c "hostname spark-n$i && exec /usr/sbin/slurmd -N spark-n$i"
  done
fi
want=$(( MULTI ? 3 : 1 ))
for _ in $(seq 1 60); do
  if (( $(sinfo -h -N -o %t 2>/dev/null | grep -cE '^(idle|mix|alloc)') >= want )); then
    echo "slurm_up: $(sinfo -h -N -o %N | sort -u | tr '\n' ' ')ready"; exit 0
  fi
  sleep 0.5
done
echo "slurm_up: node did not become idle; see /var/log/slurm/*.log" >&2
exit 1
