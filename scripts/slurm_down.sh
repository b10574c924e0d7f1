#!/usr/bin/env bash
# Stop the daemons scripts/slurm_up.sh started, by their recorded PIDs (never by name), and take down the two-node
# partition's network (namespaces, bridge, /etc/hosts lines). --net-only: only the network.
STATE=/run/spark-slurm
if [[ ${1:-} != --net-only ]]; then
  for f in "$STATE"/slurmd-*.pid "$STATE"/slurmd.pid "$STATE"/slurmctld.pid "$STATE"/munged.pid; do
    if [[ -f $f ]]; then kill "$(cat "$f")" 2>/dev/null || true; rm -f "$f"; fi
  done
fi
for i in 1 2; do
  ip netns pids spark-n$i 2>/dev/null | xargs -r kill 2>/dev/null || true   # what is left of jobs on that node
  ip link del spkn${i}h 2>/dev/null || true
  ip netns del spark-n$i 2>/dev/null || true
done
ip link del spkbr0 2>/dev/null || true
if grep -q '# spark-slurm' /etc/hosts 2>/dev/null; then
  grep -v '# spark-slurm' /etc/hosts > /etc/hosts.spark-tmp && cat /etc/hosts.spark-tmp > /etc/hosts && rm -f /etc/hosts.spark-tmp
fi
