#!/usr/bin/env bash
# Stop the daemons scripts/slurm_up.sh started, by their recorded PIDs (never by name).
STATE=/run/spark-slurm
for d in slurmd slurmctld munged; do
  f=$STATE/$d.pid
  if [[ -f $f ]]; then kill "$(cat "$f")" 2>/dev/null || true; rm -f "$f"; fi
done
