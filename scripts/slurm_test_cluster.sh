#!/usr/bin/env bash
# A single-node SLURM cluster on this machine for tests/test_slurm.py (as root, Debian/Ubuntu).
#   bash scripts/slurm_test_cluster.sh start     install what is missing, start what is not running
#   bash scripts/slurm_test_cluster.sh status    say what runs; exit 0 only when jobs can be submitted
#   bash scripts/slurm_test_cluster.sh stop      cancel jobs, stop the daemons (state is kept)
#   bash scripts/slurm_test_cluster.sh purge     stop, then delete the state directory
# Daemons: munged, mariadbd + slurmdbd (submitit reads job states from `sacct`, so accounting is
# required), slurmctld and slurmd, all started directly (no systemd, no init scripts) and stopped by
# their pid files. Config, state, logs and pid files live under $DINOV2_SLURM_DIR (default
# /tmp/dinov2-slurm); outside it there are only the /etc/slurm symlinks that let sbatch, sacct and
# submitit find the config, and munge's socket in /run/munge. Every command is safe to repeat.
# Exit status: 0 ready, 1 failed (the message says which daemon and which log), 2 cannot run here
# (not root, or packages missing and no apt-get), 3 (status only) not running.
# Environment: DINOV2_SLURM_DIR, DINOV2_SLURM_NO_APT=1 (never install), DINOV2_SLURM_WAIT=90 (seconds
# to wait for each daemon), DINOV2_SLURM_DB_PORT=3307 (MariaDB, 127.0.0.1 only).
set -euo pipefail

dir=${DINOV2_SLURM_DIR:-/tmp/dinov2-slurm}
wait_s=${DINOV2_SLURM_WAIT:-90}
db_port=${DINOV2_SLURM_DB_PORT:-3307}
cluster=dinov2test
packages=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server)

etc=$dir/etc run=$dir/run logs=$dir/log
munge_dir=$dir/munge db_dir=$dir/mariadb

say() { echo "[slurm-test-cluster] $*"; }
fail() { echo "[slurm-test-cluster] error: $1" >&2; exit "${2:-1}"; }
# The last lines of a log, to stderr, so a failure shows its cause without opening files.
show_log() { [ -f "$1" ] && { echo "--- last lines of $1:" >&2; tail -n 15 "$1" >&2; }; return 0; }
# The pid in pid file $1 is alive (/proc rather than kill -0, so that status works without root).
running() { local pid; pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && [ -d "/proc/$pid" ]; }
# poll SECONDS COMMAND...: true as soon as COMMAND succeeds (checked twice a second).
poll() {
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}

require_root() {
  [ "$(id -u)" = 0 ] || fail "must run as root (the daemons and the packages need it); run: sudo bash $0 $1" 2
}

missing_packages() {
  local p
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"
  done
}

install_packages() {
  command -v dpkg-query >/dev/null || fail "no dpkg here: this script needs a Debian or Ubuntu system" 2
  local missing
  missing=$(missing_packages | tr '\n' ' ')
  [ -n "$missing" ] || return 0
  if [ "${DINOV2_SLURM_NO_APT:-0}" = 1 ] || ! command -v apt-get >/dev/null; then
    fail "Debian packages missing: $missing(install them, or allow apt-get)" 2
  fi
  say "installing $missing"
  # Their maintainer scripts would start munged and mariadbd through init scripts; a policy-rc.d
  # that answers 101 ("not allowed") keeps every daemon ours to start. Removed again afterwards
  # unless it was already there.
  local own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  local status=0
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing; } \
    >"$logs/apt-get.log" 2>&1 || status=$?
  [ "$own_policy" = 0 ] || rm -f /usr/sbin/policy-rc.d
  if [ "$status" != 0 ]; then
    show_log $logs/apt-get.log
    fail "apt-get failed (exit $status); full output in $logs/apt-get.log"
  fi
  say "packages installed"
}

# ---------------------------------------------------------------- configuration
# Write $2 (a file's new content) to $1 only when it differs; true when it changed.
write_if_changed() {
  if [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; then return 1; fi
  printf '%s\n' "$2" >"$1.tmp" && mv "$1.tmp" "$1"
}

# Point /etc/slurm/NAME at our file. A symlink is a pointer from a test cluster (ours or another
# one) and is replaced; a real file belongs to a real installation and is never touched.
link_into_etc() {
  local name=$1 target=/etc/slurm/$1
  mkdir -p /etc/slurm
  if [ -e "$target" ] && [ ! -L "$target" ]; then
    fail "$target is a real file (another SLURM installation?): not replacing it; move it away to use this test cluster"
  fi
  ln -sfn "$etc/$name" "$target"
}

write_configs() {
  local host node_line comm_params="" changed=1
  host=$(hostname -s)
  # slurmd's own hardware probe gives the node line (sockets, cores, threads) that it will report;
  # RealMemory is dropped, memory is not a scheduled resource here (CR_CPU).
  node_line=$(slurmd -C | head -n 1 | sed -E 's/ RealMemory=[0-9]+//')
  [[ "$node_line" == NodeName=* ]] || fail "slurmd -C did not describe this node: $node_line"
  # Slurm binds to the address the host name resolves to, instead of every address, only with
  # these flags; that is loopback only when the host name resolves to 127.x (then nothing listens
  # outside). Otherwise the daemons listen on all addresses, munge-authenticated.
  if getent ahostsv4 "$(hostname)" | awk '{print $1}' | grep -qv '^127\.'; then
    say "note: $(hostname) does not resolve to loopback only; the SLURM daemons listen on all addresses (munge-authenticated)"
  else
    comm_params="CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"
  fi

  write_if_changed "$etc/slurm.conf" "# written by dinov2 scripts/slurm_test_cluster.sh: a one-node cluster for the tests
ClusterName=$cluster
SlurmctldHost=$host(127.0.0.1)
$comm_params
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# How long a requeued job waits before it may start again (Slurm's default: 120 s). 20 s puts the
# restart where the next time-limit check (every 30 s) leaves a 1-minute job its longest attempt.
AuthInfo=cred_expire=20
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Start a batch job when it is submitted and look at the queue every 5 s: requeued jobs restart soon.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
Waittime=0
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$dir/state/slurmctld
SlurmdSpoolDir=$dir/state/slurmd
SlurmctldPidFile=$run/slurmctld.pid
SlurmdPidFile=$run/slurmd.pid
SlurmctldLogFile=$logs/slurmctld.log
SlurmdLogFile=$logs/slurmd.log
$node_line NodeAddr=127.0.0.1 NodeHostname=$host State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" || changed=0

  write_if_changed "$etc/slurmdbd.conf" "# written by dinov2 scripts/slurm_test_cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
$comm_params
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=dinov2test
StorageLoc=slurm_acct_db
PidFile=$run/slurmdbd.pid
LogFile=$logs/slurmdbd.log" || true
  chmod 600 "$etc/slurmdbd.conf"  # slurmdbd refuses a config (it holds a password) others can read
  link_into_etc slurm.conf
  link_into_etc slurmdbd.conf
  [ "$changed" = 1 ] && return 0 || return 1
}

# ---------------------------------------------------------------- daemons
munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munged() {
  if running "$munge_dir/munged.pid" && munge_works; then say "munged running (pid $(cat "$munge_dir/munged.pid"))"; return; fi
  if munge_works; then
    # Another munged answers on the standard socket: Slurm only needs one, so use it.
    say "munged: using the munged already answering on /run/munge (not started by this script)"
    return
  fi
  install -d -o munge -g munge -m 700 "$munge_dir"
  install -d -o munge -g munge -m 755 /run/munge  # systemd would create it
  if [ ! -s "$munge_dir/munge.key" ]; then
    mungekey --create --keyfile="$munge_dir/munge.key"
    chown munge:munge "$munge_dir/munge.key"
    chmod 400 "$munge_dir/munge.key"
  fi
  # The socket stays at the standard path: every Slurm program looks there.
  runuser -u munge -- /usr/sbin/munged --key-file="$munge_dir/munge.key" --pid-file="$munge_dir/munged.pid" \
    --log-file="$munge_dir/munged.log" --seed-file="$munge_dir/munged.seed" \
    || { show_log "$munge_dir/munged.log"; fail "munged did not start"; }
  poll "$wait_s" munge_works || { show_log "$munge_dir/munged.log"; fail "munged does not answer"; }
  say "munged started (pid $(cat "$munge_dir/munged.pid"))"
}

sql() { mariadb --no-defaults --socket="$run/mariadb/mariadb.sock" -u root -N -e "$1"; }

start_mariadbd() {
  install -d -o mysql -g mysql -m 755 "$run/mariadb"
  if running "$run/mariadb/mariadb.pid" && sql "SELECT 1" >/dev/null 2>&1; then
    say "mariadbd running (pid $(cat "$run/mariadb/mariadb.pid"))"
    return
  fi
  if [ ! -d "$db_dir/mysql" ]; then
    install -d -o mysql -g mysql -m 750 "$db_dir"
    mariadb-install-db --no-defaults --user=mysql --datadir="$db_dir" --skip-test-db \
      --auth-root-authentication-method=socket >"$logs/mariadb-install-db.log" 2>&1 \
      || { show_log "$logs/mariadb-install-db.log"; fail "mariadb-install-db failed"; }
  fi
  touch "$logs/mariadbd.log" && chown mysql:mysql "$logs/mariadbd.log"
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$db_dir" --bind-address=127.0.0.1 \
    --port="$db_port" --socket="$run/mariadb/mariadb.sock" --pid-file="$run/mariadb/mariadb.pid" \
    --log-error="$logs/mariadbd.log" --skip-name-resolve --innodb-buffer-pool-size=64M \
    --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
  poll "$wait_s" sql "SELECT 1" || { show_log "$logs/mariadbd.log"; fail "mariadbd does not answer on $run/mariadb/mariadb.sock"; }
  say "mariadbd started (pid $(cat "$run/mariadb/mariadb.pid"), 127.0.0.1:$db_port)"
}

start_slurmdbd() {
  sql "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
       CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'dinov2test';
       GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" \
    || fail "could not create the accounting database (see $logs/mariadbd.log)"
  if running "$run/slurmdbd.pid"; then
    say "slurmdbd running (pid $(cat "$run/slurmdbd.pid"))"
  else
    /usr/sbin/slurmdbd || { show_log "$logs/slurmdbd.log"; fail "slurmdbd did not start"; }
    poll "$wait_s" sacctmgr -n show cluster || { show_log "$logs/slurmdbd.log"; fail "slurmdbd does not answer"; }
    say "slurmdbd started (pid $(cat "$run/slurmdbd.pid"))"
  fi
  # slurmctld only records jobs for a cluster the database knows.
  if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$cluster"; then
    sacctmgr -i add cluster "$cluster" >/dev/null || fail "sacctmgr could not register cluster $cluster"
  fi
}

start_slurmctld() {
  local reconfigure=$1
  if running "$run/slurmctld.pid"; then
    say "slurmctld running (pid $(cat "$run/slurmctld.pid"))"
    if [ "$reconfigure" = 1 ]; then say "slurm.conf changed: scontrol reconfigure"; scontrol reconfigure; fi
  else
    /usr/sbin/slurmctld || { show_log "$logs/slurmctld.log"; fail "slurmctld did not start"; }
    say "slurmctld started"
  fi
  poll "$wait_s" controller_up || { show_log "$logs/slurmctld.log"; fail "slurmctld does not answer"; }
}

controller_up() { scontrol ping | grep -q 'is UP'; }
node_usable() { sinfo -h -N -o '%T' | grep -qE '^(idle|mixed|allocated|completing)'; }

start_slurmd() {
  if running "$run/slurmd.pid"; then
    say "slurmd running (pid $(cat "$run/slurmd.pid"))"
  else
    /usr/sbin/slurmd || { show_log "$logs/slurmd.log"; fail "slurmd did not start"; }
    say "slurmd started"
  fi
  if ! poll "$wait_s" node_usable; then
    # A node left down or drained by an earlier, unclean stop: bring it back once.
    scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    poll 15 node_usable || { sinfo -N -l >&2; show_log "$logs/slurmd.log"; fail "the node did not become idle"; }
  fi
}

start() {
  require_root start
  umask 022
  mkdir -p "$etc" "$run" "$logs" "$dir/state/slurmctld" "$dir/state/slurmd"
  chmod 755 "$dir" "$run" "$logs"
  install_packages
  local reconfigure=0
  write_configs && reconfigure=1
  start_munged
  start_mariadbd
  start_slurmdbd
  start_slurmctld "$reconfigure"
  start_slurmd
  say "ready: $(sinfo -h -o 'partition %P, %D node(s), %T')"
}

# ---------------------------------------------------------------- stop / status
stop_daemon() {
  local name=$1 pid_file=$2 pid
  if ! running "$pid_file"; then rm -f "$pid_file"; return; fi
  pid=$(cat "$pid_file")
  kill -TERM "$pid"
  if ! poll 30 bash -c "! kill -0 $pid"; then
    say "$name (pid $pid) ignored SIGTERM for 30 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pid_file"
  say "$name stopped (pid $pid)"
}

stop() {
  require_root stop
  if running "$run/slurmctld.pid"; then
    # Job processes are not in cgroups here: cancel them so none outlives the cluster.
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      say "cancelling jobs $jobs"
      scancel $jobs 2>/dev/null || true
      poll 30 bash -c '[ -z "$(squeue -h -o %i 2>/dev/null)" ]' || say "some jobs are still ending: $(squeue -h -o '%i %T' | tr '\n' ' ')"
    fi
  fi
  stop_daemon slurmd "$run/slurmd.pid"
  stop_daemon slurmctld "$run/slurmctld.pid"
  stop_daemon slurmdbd "$run/slurmdbd.pid"
  stop_daemon mariadbd "$run/mariadb/mariadb.pid"
  stop_daemon munged "$munge_dir/munged.pid"
}

status() {
  local name pid_file all=0
  for name in munged mariadbd slurmdbd slurmctld slurmd; do
    case $name in
      munged) pid_file=$munge_dir/munged.pid ;;
      mariadbd) pid_file=$run/mariadb/mariadb.pid ;;
      *) pid_file=$run/$name.pid ;;
    esac
    if [ "$(id -u)" != 0 ] && { [ ! -x "${pid_file%/*}" ] || { [ -e "$pid_file" ] && [ ! -r "$pid_file" ]; }; }; then
      say "$name: its pid file is readable by root only"
    elif running "$pid_file"; then
      say "$name running (pid $(cat "$pid_file"))"
    else
      say "$name not running"; all=3
    fi
  done
  if command -v sinfo >/dev/null && controller_up 2>/dev/null && node_usable 2>/dev/null; then
    say "jobs can be submitted: $(sinfo -h -o 'partition %P, %D node(s), %T')"
  else
    say "not ready for jobs (start it: bash $0 start)"
    all=3
  fi
  return "$all"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  purge)
    stop
    for name in slurm.conf slurmdbd.conf; do
      if [ "$(readlink "/etc/slurm/$name" 2>/dev/null)" = "$etc/$name" ]; then rm -f "/etc/slurm/$name"; fi
    done
    rm -rf "$dir"
    say "removed $dir"
    ;;
  status) status ;;
  *) echo "usage: $0 start|status|stop|purge" >&2; exit 64 ;;
esac
