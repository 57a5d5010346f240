#!/usr/bin/env bash
# A throwaway Slurm cluster on this one machine, for testing launch/slurm.sbatch for real.
#
#   launch/ci-slurm.sh install      apt-get the Debian packages (slurmctld, slurmd, slurm-client, munge)
#   launch/ci-slurm.sh start DIR    write DIR/slurm.conf and start munged, slurmctld and two slurmd
#                                   (nodes unitmatch-n1 and unitmatch-n2 on this host, one port each)
#   launch/ci-slurm.sh stop DIR     stop what `start DIR` started (by the pid files in DIR)
#
# After `start`, point the client commands at the cluster with `export SLURM_CONF=DIR/slurm.conf`.
# Needs root (daemons, munge key). Each node gets half of this machine's CPUs and one GPU gres
# whose "device" is /dev/null (a logical GPU: Slurm schedules it and sets SLURM_GPUS_ON_NODE, Ray
# counts it, torch sees no CUDA), so the GPU requests of the batch script are exercised too.
# Two slurmd on one host work with Debian's packages: each node has its own Port, spool and pid file.
# Accounting is off (no slurmdbd): job states come from `scontrol show job` and from the
# completion log DIR/jobcomp.log (jobcomp/filetxt).
set -euo pipefail

NODES=(unitmatch-n1 unitmatch-n2)
PORTS=(17101 17102)
CTLD_PORT=17100

die() { echo "ci-slurm: $*" >&2; exit 1; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    echo "ci-slurm: Slurm is installed ($(slurmctld -V))"
    return
  fi
  [ "$(id -u)" -eq 0 ] || die "installing Slurm needs root"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  echo "ci-slurm: installed $(slurmctld -V)"
}

start() {
  local dir=$1
  [ "$(id -u)" -eq 0 ] || die "starting slurmctld and slurmd needs root"
  mkdir -p "$dir"/{ctld,log}
  local node
  for node in "${NODES[@]}"; do mkdir -p "$dir/spool-$node"; done
  dir=$(cd "$dir" && pwd)
  # slurmstepd makes Unix sockets in the spool directory: their paths must stay under 108 bytes
  [ "${#dir}" -le 40 ] || die "DIR $dir is too long (${#dir} characters); use a short one such as /tmp/umslurm"
  local cpus=$(( $(nproc) / ${#NODES[@]} ))
  [ "$cpus" -ge 1 ] || cpus=1
  local mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) / ${#NODES[@]} / 2 ))
  local host
  host=$(hostname -s)

  # munge: Debian's package made a key; the daemon's socket dir may not exist without systemd
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; }
  if ! munge -n </dev/null >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n </dev/null >/dev/null || die "munged did not start"
    echo started > "$dir/munged.started"
  fi

  {
    echo "ClusterName=unitmatch-ci"
    echo "SlurmctldHost=$host"
    echo "SlurmctldPort=$CTLD_PORT"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "StateSaveLocation=$dir/ctld"
    echo "SlurmdSpoolDir=$dir/spool-%n"
    echo "SlurmctldPidFile=$dir/slurmctld.pid"
    echo "SlurmdPidFile=$dir/slurmd-%n.pid"
    echo "SlurmctldLogFile=$dir/log/slurmctld.log"
    echo "SlurmdLogFile=$dir/log/slurmd-%n.log"
    # no cgroups in containers: track processes by parent pid, no task containment
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/filetxt"
    echo "JobCompLoc=$dir/jobcomp.log"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "GresTypes=gpu"
    echo "ReturnToService=2"
    echo "MpiDefault=none"
    echo "MailProg=/bin/true"
    # several nodes share this host's hardware: the configured CPUs count, not the detected ones
    echo "SlurmdParameters=config_overrides"
    echo "MinJobAge=3600"
    echo "InactiveLimit=0"
    echo "KillWait=10"
    for i in "${!NODES[@]}"; do
      echo "NodeName=${NODES[$i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${PORTS[$i]} CPUs=$cpus RealMemory=$mem Gres=gpu:1 State=UNKNOWN"
    done
    echo "PartitionName=ci Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
  } > "$dir/slurm.conf"
  # /dev/null as the "device": Slurm schedules and counts the GPU, there is nothing to bind
  for node in "${NODES[@]}"; do echo "NodeName=$node Name=gpu Count=1 File=/dev/null"; done > "$dir/gres.conf"

  export SLURM_CONF=$dir/slurm.conf
  slurmctld -f "$SLURM_CONF" -i
  for node in "${NODES[@]}"; do
    slurmd -f "$SLURM_CONF" -N "$node"
  done
  for _ in $(seq 60); do
    if [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" -eq "${#NODES[@]}" ]; then
      sinfo -N
      echo "ci-slurm: up; export SLURM_CONF=$SLURM_CONF"
      return
    fi
    sleep 1
  done
  sinfo -N || true
  tail -n 20 "$dir"/log/*.log >&2 || true
  die "the nodes did not become idle within 60 s (logs above)"
}

stop() {
  local dir=$1 pidfile pid
  for pidfile in "$dir"/slurmd-*.pid "$dir"/slurmctld.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  done
  if [ -f "$dir/munged.started" ] && [ -f /run/munge/munged.pid ]; then
    kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    rm -f "$dir/munged.started"
  fi
  echo "ci-slurm: stopped"
}

case "${1:-}" in
  install) install ;;
  start) [ -n "${2:-}" ] || die "usage: $0 start DIR"; start "$2" ;;
  stop) [ -n "${2:-}" ] || die "usage: $0 stop DIR"; stop "$2" ;;
  *) die "usage: $0 install | start DIR | stop DIR" ;;
esac
