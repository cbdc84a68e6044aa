#!/usr/bin/env bash
# Stop the local SLURM that cluster/local/start.sh recorded in STATE_DIR: its jobs first, then
# exactly the daemons whose PIDs it wrote down. Nothing else is signalled.
set -uo pipefail

STATE="${1:-${DTRAIN_SLURM_DIR:-/tmp/dtrain-slurm}}"
[[ -d "$STATE" ]] || { echo "cluster/local: nothing recorded in $STATE"; exit 0; }
STATE="$(cd "$STATE" && pwd)"
HOSTS_TAG="# dtrain-local-slurm $STATE"  # marks the /etc/hosts lines this cluster added

alive() {
    [[ -s "$1" ]] || return 1
    local state
    state="$(awk '{print $3}' "/proc/$(cat "$1")/stat" 2>/dev/null || true)"
    [[ -n "$state" && "$state" != Z ]]
}

if alive "$STATE/slurmctld.pid"; then
    # slurmd does not kill running jobs when it stops: cancel them while the controller listens.
    SLURM_CONF="$STATE/slurm.conf" timeout 10 scancel --full --quiet --user=root 2>/dev/null || true
fi
PIDFILES=("$STATE"/slurmd-n1.pid "$STATE"/slurmd-n2.pid "$STATE"/slurmd-n3.pid "$STATE"/slurmctld.pid "$STATE"/munged.pid)
for pidfile in "${PIDFILES[@]}"; do
    if alive "$pidfile"; then
        kill "$(cat "$pidfile")"
    fi
done
for pidfile in "${PIDFILES[@]}"; do
    for _ in $(seq 1 50); do
        alive "$pidfile" || break
        sleep 0.1
    done
    if alive "$pidfile"; then
        kill -9 "$(cat "$pidfile")"
    fi
    rm -f "$pidfile"
done
# Remove only the lines start.sh added (rewrite in place: /etc/hosts may be a bind mount).
if grep -qF "$HOSTS_TAG" /etc/hosts; then
    kept="$(grep -vF "$HOSTS_TAG" /etc/hosts)"
    printf '%s\n' "$kept" > /etc/hosts
fi
echo "cluster/local: stopped the cluster recorded in $STATE"
