#!/usr/bin/env bash
# A real two-node SLURM cluster on one Linux machine (root only), for tests/test_slurm.py and by hand:
#
#   bash tests/slurm_cluster/cluster.sh up   [STATE_DIR]   # prints the SLURM_CONF to export; ~10 s
#   export SLURM_CONF=/tmp/clora-slurm/slurm.conf; sinfo; sbatch --nodes=2 launch/slurm/train.sbatch ...
#   bash tests/slurm_cluster/cluster.sh down [STATE_DIR]   # always safe; `up` runs it first
#
# slurmctld runs on the host and listens on bridge clorabr0 (10.213.0.1). Nodes clora-n1 and clora-n2 are
# network namespaces of the same names, each with interface clora0 (10.213.0.11 / .12) on the bridge,
# each running its own slurmd; munged (own key and socket under STATE_DIR) authenticates all of them.
# Namespaces share the file system, so jobs see this checkout and this Python. Set GLOO_SOCKET_IFNAME=clora0
# for jobs: the hostname resolves to 127.0.0.1, where gloo would otherwise bind.
#
# Why these choices (found by trial on Debian 12, slurm 22.05):
#   - slurmd is started with `nsenter --net=...`: `ip netns exec` remounts /sys, and slurmd then fails on cgroups.
#   - proctrack/linuxproc + task/none: no cgroup tree is needed per "node".
#   - SlurmctldHost is the host's short hostname with the bridge address, so the namespaces can reach it.
# `down` ends only what `up` started: every process inside the two namespaces, and slurmctld / munged by the
# pid files under STATE_DIR (checked against their command line). Then namespaces, bridge and STATE_DIR go.
set -euo pipefail

ACTION="${1:-}"
STATE="${2:-/tmp/clora-slurm}"
HERE="$(cd "$(dirname "$0")" && pwd)"
BRIDGE=clorabr0
NODES=(clora-n1 clora-n2)
ADDRS=(10.213.0.11 10.213.0.12)
CTLD_ADDR=10.213.0.1
IFNAME=clora0

die() { echo "cluster.sh: $*" >&2; exit 1; }

kill_pidfile() {  # kill_pidfile FILE: the process named there, if its command line mentions STATE
  local f="$1" pid
  [ -f "$f" ] || return 0
  pid="$(cat "$f" 2>/dev/null || true)"
  if [[ "$pid" =~ ^[0-9]+$ ]] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$STATE"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
}

down() {
  local ns pids
  for ns in "${NODES[@]}"; do  # slurmd, slurmstepd and job tasks of that node: all live in its namespace
    if [ -e "/var/run/netns/$ns" ]; then
      pids="$(ip netns pids "$ns" 2>/dev/null || true)"
      [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
  kill_pidfile "$STATE/slurmctld.pid"
  kill_pidfile "$STATE/munge/munged.pid"
  ip link del "$BRIDGE" 2>/dev/null || true
  case "$STATE" in /tmp/*|/run/*|/var/tmp/*) rm -rf "$STATE" ;; *) [ ! -d "$STATE" ] || echo "cluster.sh: left $STATE in place" >&2 ;; esac
}

up() {
  [ "$(id -u)" = 0 ] || die "must run as root (network namespaces, daemons as root)"
  for bin in slurmctld slurmd munged sinfo nsenter ip; do
    command -v "$bin" >/dev/null || die "$bin not found; apt-get install -y --no-install-recommends slurm-wlm munge"
  done
  down
  mkdir -p "$STATE"/{ctld,log,munge,spool/clora-n1,spool/clora-n2}
  chmod 755 "$STATE/munge"

  dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$STATE/munge/munge.key"
  munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket.2" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed" \
    || die "munged failed: $(tail -3 "$STATE/log/munged.log" 2>/dev/null)"

  ip link add "$BRIDGE" type bridge
  ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  local i ns
  for i in "${!NODES[@]}"; do
    ns="${NODES[$i]}"
    ip netns add "$ns"
    ip link add "${ns}h" type veth peer name "$IFNAME" netns "$ns"
    ip link set "${ns}h" master "$BRIDGE"
    ip link set "${ns}h" up
    ip -n "$ns" addr add "${ADDRS[$i]}/24" dev "$IFNAME"
    ip -n "$ns" link set "$IFNAME" up
    ip -n "$ns" link set lo up
  done

  # every node may run two tasks (the tests' 2-tasks-per-node job) whatever this machine reports: `nproc` obeys
  # OMP_NUM_THREADS (1 under the test suite's children), so the hardware count is read with getconf
  CPUS=$(getconf _NPROCESSORS_ONLN); [ "$CPUS" -ge 2 ] || CPUS=2
  sed -e "s|@STATE@|$STATE|g" -e "s|@HOST@|$(hostname -s)|g" -e "s|@CTLD_ADDR@|$CTLD_ADDR|g" \
      -e "s|@N1_ADDR@|${ADDRS[0]}|g" -e "s|@N2_ADDR@|${ADDRS[1]}|g" -e "s|@CPUS@|$CPUS|g" \
      "$HERE/slurm.conf.in" >"$STATE/slurm.conf"
  export SLURM_CONF="$STATE/slurm.conf"
  slurmctld -c -f "$SLURM_CONF" || die "slurmctld failed: $(tail -5 "$STATE/log/slurmctld.log" 2>/dev/null)"
  for ns in "${NODES[@]}"; do
    nsenter --net="/var/run/netns/$ns" slurmd -f "$SLURM_CONF" -N "$ns" \
      || die "slurmd $ns failed: $(tail -5 "$STATE/log/slurmd-$ns.log" 2>/dev/null)"
  done
  for _ in $(seq 120); do
    if [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle$')" = "${#NODES[@]}" ]; then
      echo "SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.5
  done
  sinfo -N -l >&2 || true
  tail -5 "$STATE"/log/*.log >&2 || true
  die "the nodes did not come up idle within 60 s"
}

case "$ACTION" in
  up) up ;;
  down) down ;;
  *) die "usage: cluster.sh up|down [STATE_DIR]" ;;
esac
