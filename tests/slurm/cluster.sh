#!/usr/bin/env bash
# A two-node Slurm cluster on this one machine, for the tests (run as root; Debian's slurm-wlm and munge).
#
#   tests/slurm/cluster.sh up DIR      # start it; state, logs and slurm.conf under DIR
#   tests/slurm/cluster.sh run DIR CMD # run CMD where the cluster can be reached (node n1's network)
#   tests/slurm/cluster.sh down DIR    # stop every daemon and remove the namespaces
#
# Each node lives in its own network namespace with its own hostname (n1, n2) and loopback-range address
# (127.0.100.11, .12), joined by a bridge in a third namespace, and sees a hosts file naming both. So a job
# that points its rendezvous at localhost fails here as it would on a real cluster.
set -euo pipefail
action=$1
dir=$(realpath -m "$2")
shift 2
nodes=(n1 n2)
declare -A addr=([n1]=127.0.100.11 [n2]=127.0.100.12)
declare -A port=([n1]=17101 [n2]=17102)
ctld_port=17117

in_node() { # NODE CMD...: CMD in NODE's network, hostname and hosts file
    local node=$1; shift
    # shellcheck disable=SC2016  # expanded by the inner sh
    nsenter --net="/run/netns/gos-$node" unshare --uts --mount \
        sh -c 'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"' "$node" "$dir/hosts" "$@"
}

up() {
    remove_namespaces  # left by a run that could not clean up
    mkdir -p "$dir"/{state,log,run,munge} "$dir"/spool/{n1,n2}
    chmod 755 "$dir/munge"  # munged refuses a socket folder others cannot read
    mungekey --create --force --keyfile="$dir/munge/munge.key"
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.sock" \
        --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"

    printf '127.0.0.1 localhost\n%s n1\n%s n2\n' "${addr[n1]}" "${addr[n2]}" > "$dir/hosts"
    ip netns add gos-br
    ip -n gos-br link add br0 type bridge
    ip -n gos-br link set br0 up
    for node in "${nodes[@]}"; do
        ip netns add "gos-$node"
        ip link add "v-$node" netns gos-br type veth peer name eth0 netns "gos-$node"
        ip -n gos-br link set "v-$node" master br0 up
        # 127/8 is local on every lo: shrink it so the other node's 127.0.100.x goes out over eth0.
        ip -n "gos-$node" link set lo up
        ip -n "gos-$node" addr del 127.0.0.1/8 dev lo
        ip -n "gos-$node" addr add 127.0.0.1/32 dev lo
        ip -n "gos-$node" addr add "${addr[$node]}/24" dev eth0
        ip -n "gos-$node" link set eth0 up
        nsenter --net="/run/netns/gos-$node" sysctl -qw net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.eth0.route_localnet=1
    done

    cat > "$dir/slurm.conf" <<CONF
ClusterName=gos
SlurmctldHost=n1(${addr[n1]})
SlurmctldPort=$ctld_port
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
NodeName=n1 NodeHostname=n1 NodeAddr=${addr[n1]} Port=${port[n1]} CPUs=2 RealMemory=8000 State=UNKNOWN
NodeName=n2 NodeHostname=n2 NodeAddr=${addr[n2]} Port=${port[n2]} CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
    in_node n1 slurmctld -f "$dir/slurm.conf"
    for node in "${nodes[@]}"; do in_node "$node" slurmd -f "$dir/slurm.conf" -N "$node"; done
    for _ in $(seq 60); do
        if [[ $(in_node n1 env SLURM_CONF="$dir/slurm.conf" sinfo -h -N -o %N -t idle 2>/dev/null | wc -l) -eq 2 ]]; then
            return 0
        fi
        sleep 0.5
    done
    echo "cluster.sh: nodes did not come up; see $dir/log" >&2
    return 1
}

down() {
    for pidfile in "$dir"/run/slurmd-*.pid "$dir/run/slurmctld.pid" "$dir/run/munged.pid"; do
        [[ -f "$pidfile" ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    remove_namespaces
}

remove_namespaces() {
    # Job steps the daemons started may outlive them: end whatever still runs in the nodes' networks.
    for ns in gos-n1 gos-n2 gos-br; do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        # shellcheck disable=SC2086  # one pid a word
        [[ -n "$pids" ]] && kill -9 $pids 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
}

case $action in
    up) up ;;
    down) down ;;
    run) in_node n1 env SLURM_CONF="$dir/slurm.conf" "$@" ;;
    *) echo "usage: $0 up|down|run DIR [CMD...]" >&2; exit 2 ;;
esac
