#!/usr/bin/env bash
# Install (when missing) and start a one-node Slurm cluster on this machine, as root.
#
#   sudo .ci/slurm-setup.sh            # idempotent: a running, healthy cluster is left alone
#   sudo .ci/slurm-setup.sh --stop     # stop slurmctld/slurmd (munged is left running)
#
# Used by tests/slurm_harness.py (the @pytest.mark.slurm tests) and by CI.
# What it sets up: Debian's slurm-wlm + munge, slurmctld and slurmd on this host,
# proctrack/linuxproc and task/none (no cgroups, so it works in containers and VMs),
# accounting off, job requeue on, and one partition "debug" whose single node
# declares ECOMTRAIN_SLURM_CPUS CPUs (default 8) even on a 2-core machine:
# SlurmdParameters=config_overrides lets the node claim more CPUs than it has,
# so a 2-task job plus a second queued job fit on a 2-core CI runner.
# Starting takes ~3 s; installing ~30-60 s from the Debian mirror.
set -euo pipefail

CPUS="${ECOMTRAIN_SLURM_CPUS:-8}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
HOST="$(hostname -s)"
LOG_DIR=/var/log/slurm

log() { echo "[slurm-setup] $*" >&2; }

if [[ "$(id -u)" != 0 ]]; then
  log "must run as root (it installs packages and starts daemons)"; exit 1
fi

if [[ "${1:-}" == "--stop" ]]; then
  for d in slurmd slurmctld; do
    if [[ -f "/run/$d.pid" ]]; then kill "$(cat "/run/$d.pid")" 2>/dev/null || true; fi
  done
  exit 0
fi

healthy() {
  # controller answers and our node is usable (idle/mixed/allocated, not down/drained)
  scontrol ping 2>/dev/null | grep -q "is UP" || return 1
  local state
  state="$(sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n1)"
  [[ "$state" =~ ^(idle|mix|alloc|comp)$ ]]
}

# 1. packages -------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# 2. munge (Slurm authenticates every RPC with it) ---------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
  log "creating munge key"
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# 3. slurm.conf --------------------------------------------------------------------
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"
cat >"$CONF.new" <<EOF
# written by ecomtrain .ci/slurm-setup.sh: one-node test cluster on $HOST
ClusterName=ecomtrain
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=10
Waittime=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
if ! cmp -s "$CONF.new" "$CONF" 2>/dev/null; then
  mv "$CONF.new" "$CONF"
  "$0" --stop  # a changed config needs fresh daemons
  sleep 1
else
  rm -f "$CONF.new"
  if healthy; then log "already running on $HOST"; exit 0; fi
fi

# 4. daemons -------------------------------------------------------------------------
running() { [[ -f "/run/$1.pid" ]] && kill -0 "$(cat "/run/$1.pid")" 2>/dev/null; }
if ! running slurmctld; then log "starting slurmctld"; slurmctld; fi
if ! running slurmd; then log "starting slurmd"; slurmd; fi

for _ in $(seq 100); do
  if healthy; then log "up: $(sinfo -h -o '%P %D %c %t')"; exit 0; fi
  # a node left DOWN/DRAINED by an earlier crash: bring it back
  scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
  sleep 0.3
done
log "Slurm did not come up; last lines of the logs:"
tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
exit 1
