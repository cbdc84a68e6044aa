#!/usr/bin/env bash
# Start a real SLURM (munged, slurmctld, and one slurmd per logical node n1, n2, n3) on this machine,
# for development and CI. Idempotent: if this state directory's daemons are up, it does nothing.
#
#   cluster/local/start.sh [STATE_DIR]     (default: $DTRAIN_SLURM_DIR or /tmp/dtrain-slurm)
#   source STATE_DIR/env.sh                (points sbatch/squeue/... at this cluster: SLURM_CONF)
#   cluster/local/stop.sh [STATE_DIR]      (stops only the daemons recorded here)
#
# Needs root (slurmd and munged run as root/munge). Installs Debian's packages when they are missing.
set -euo pipefail

STATE="${1:-${DTRAIN_SLURM_DIR:-/tmp/dtrain-slurm}}"
CTLD_PORT="${DTRAIN_SLURM_PORT:-16817}"       # slurmd of n1, n2 and n3 listen on the next three ports
NODES=(n1 n2 n3)

say() { echo "cluster/local: $*"; }

alive() {  # alive PIDFILE: the recorded process exists and is not a zombie
    [[ -s "$1" ]] || return 1
    local pid state
    pid="$(cat "$1")"
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ -n "$state" && "$state" != Z ]]
}

if [[ $EUID -ne 0 ]]; then
    echo "cluster/local/start.sh must run as root (slurmd and munged need it)." >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    say "installing slurmctld slurmd slurm-client munge (Debian packages) ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
HOSTS_TAG="# dtrain-local-slurm $STATE"  # marks the /etc/hosts lines this cluster added
add_hosts() {  # the logical node names must resolve; /etc/hosts may be a bind mount: append in place
    grep -qF "$HOSTS_TAG" /etc/hosts || for i in "${!NODES[@]}"; do
        printf '127.0.0.%d %s %s\n' $((i + 1)) "${NODES[$i]}" "$HOSTS_TAG" >> /etc/hosts
    done
}

if alive "$STATE/munged.pid" && alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd-n1.pid" \
        && alive "$STATE/slurmd-n2.pid" && alive "$STATE/slurmd-n3.pid"; then
    add_hosts
    say "already running in $STATE"
    exit 0
fi
if [[ -e "$STATE/munged.pid" || -e "$STATE/slurmctld.pid" ]]; then
    say "a partly running cluster is recorded in $STATE; stopping it first"
    "$(dirname "$0")/stop.sh" "$STATE"
fi

add_hosts
mkdir -p "$STATE"/{munge,spool/n1,spool/n2,spool/n3,ctld,log}
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))
CPUS="$(nproc)"
HOST="$(hostname -s)"

# munged, private to this cluster: its own key and socket, never the system one.
chmod 755 "$STATE"
chown munge: "$STATE/munge" && chmod 755 "$STATE/munge"
if ! runuser -u munge -- test -w "$STATE/munge"; then
    echo "cluster/local: the munge user cannot reach $STATE/munge; pick a STATE_DIR whose parent folders others may enter." >&2
    exit 1
fi
dd if=/dev/urandom bs=1024 count=1 of="$STATE/munge/munge.key" status=none
chown munge: "$STATE/munge/munge.key" && chmod 400 "$STATE/munge/munge.key"
runuser -u munge -- munged --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge/munge.key" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munge.seed"
cp "$STATE/munge/munged.pid" "$STATE/munged.pid"

cat > "$STATE/slurm.conf" <<CONF
ClusterName=dtrainlocal
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdSpoolDir=$STATE/spool/%n
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
MinJobAge=300
JobRequeue=1
$(for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[$i]} NodeHostname=$HOST NodeAddr=127.0.0.$((i + 1)) Port=$((CTLD_PORT + i + 1)) CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
done)
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
echo "export SLURM_CONF=$STATE/slurm.conf" > "$STATE/env.sh"

export SLURM_CONF="$STATE/slurm.conf"
slurmctld -f "$SLURM_CONF"
for node in "${NODES[@]}"; do
    slurmd -f "$SLURM_CONF" -N "$node"
done

for _ in $(seq 1 100); do
    if [[ "$(sinfo -h -o '%T' -N 2>/dev/null | sort -u | tr -d '\n')" == idle ]]; then
        say "running in $STATE (nodes ${NODES[*]} idle); use it with: source $STATE/env.sh"
        exit 0
    fi
    sleep 0.2
done
say "nodes did not become idle within 20 s; see $STATE/log/" >&2
sinfo -N >&2 || true
exit 1
