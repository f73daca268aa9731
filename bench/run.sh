#!/usr/bin/env bash
# peapod's benchmarks: every figure a ratio to a baseline measured in the same run.
#
#   bench/run.sh [--quick] [--repeat N] [--figures LIST] [--build DIR] [--keep DIR]
#
#   --quick         2 repeats, density up to 4 pods, fewer execs (a few minutes)
#   --repeat N      repeats per figure (default 5; median and spread are reported)
#   --figures LIST  comma-separated subset of cold,warm,template,ksm,pods,density,cold16,callgrind,flood (default all;
#                   the floor is always measured, with cold)
#   --build DIR     peapod's build dir (default build): sandboxer/, shim/, vm-images/
#   --keep DIR      copy the run's logs (sandboxer, containerd, consoles) into DIR at the end
#
# Writes bench/results/<date>.json (the numbers), <date>.md (the report, also latest.md),
# <date>-*.png (plots) and <date>.callgrind/ (raw profiles). bench/report.py regenerates the
# report and plots from the JSON alone.
#
# Everything lives under a temporary root (mktemp -d /tmp/ppb-XXXXXX) plus the sandboxer's
# short run dir (/run/pp-bench.XXXXXX); libvirt's embedded root is /var/lib/peapod/bench-libvirt
# (kept: it caches libvirt's QEMU capability probe; a lock there allows one run at a time). On
# exit, failure, Ctrl-C or SIGTERM all of it is torn down: pods removed through CRI, every
# process started (and every shim or QEMU naming the root on its command line) killed, mounts
# under the root unmounted, the run's netns, TAPs and bridge deleted, the directories removed.
#
# Environment: PEAPOD_ACCEL=kvm to boot VMs with KVM (default tcg).
set -euo pipefail
{
src=$(cd "$(dirname "$0")/.." && pwd)
cd "$src"

log() { printf '== %s\n' "$*" >&2; }
die() {
  printf 'bench: error: %s\n' "$*" >&2
  exit 1
}

quick=0
repeat=
figures=cold,warm,template,ksm,pods,density,cold16,callgrind,flood
build=build
keep=
while (($#)); do
  case $1 in
  --quick) quick=1 ;;
  --repeat) repeat=${2:?--repeat needs a value} && shift ;;
  --figures) figures=${2:?--figures needs a value} && shift ;;
  --build) build=${2:?--build needs a value} && shift ;;
  --keep) keep=${2:?--keep needs a value} && shift ;;
  -h | --help)
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
    exit 0
    ;;
  *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
[[ -z $repeat ]] && { ((quick)) && repeat=2 || repeat=5; }
[[ $repeat =~ ^[1-9][0-9]*$ ]] || die "--repeat wants a positive number"
density=50 exec_count=30
((quick)) && density=4 exec_count=10
build=$(cd "$build" 2>/dev/null && pwd) || die "build dir not found (make build, or --build DIR)"

# ---------------------------------------------------------------- prerequisites

[[ $(id -u) == 0 ]] || die "run as root (containerd, mounts, network, libvirt)"
py=/usr/bin/python3 # Debian's: it has python3-matplotlib
for f in sandboxer/peapod-sandboxer shim/containerd-shim-peapod-v2 vm-images/vmlinux \
  vm-images/initrd.img vm-images/cmdline; do
  [[ -e $build/$f ]] || die "$build/$f missing: make build"
done
for t in qemu-system-x86_64 runc /usr/bin/containerd /usr/lib/cni/bridge valgrind \
  callgrind_annotate callgrind_control mkfs.erofs $py; do
  command -v "$t" >/dev/null || die "$t not found: scripts/install-deps.sh --apt-only"
done
$py -c 'import matplotlib' 2>/dev/null || die "python3-matplotlib missing: scripts/install-deps.sh --apt-only"
ctd_bin=$(scripts/go-tools.sh --print-path containerd)
crictl=$(scripts/go-tools.sh --print-path crictl)/crictl
[[ -x $ctd_bin/containerd && -x $crictl ]] || die "containerd 2.x / crictl not built: scripts/go-tools.sh containerd crictl"

libvirt_root=/var/lib/peapod/bench-libvirt
mkdir -p "$libvirt_root"
exec {lock_fd}>"$libvirt_root.lock"
flock -n "$lock_fd" || die "another bench/run.sh holds $libvirt_root.lock"

accel=tcg
[[ ${PEAPOD_ACCEL:-} == kvm ]] && accel=kvm

# ---------------------------------------------------------------- the temporary root, teardown

dir=$(mktemp -d /tmp/ppb-XXXXXX)
chmod 711 "$dir"  # pod VMs (QEMU as uids of their own) pass through to their disks
rundir=$(mktemp -d /run/pp-bench.XXXXXX) # the sandboxer's run_dir: at most 23 characters
stamp=$(date +%Y-%m-%d-%H%M%S)
((quick)) && stamp+=-quick
results=$src/bench/results
mkdir -p "$results"
bench_pid=

pids_naming() { # PIDs whose command line names one of the given paths
  local f pid cmd path
  for f in /proc/[0-9]*/cmdline; do
    pid=${f#/proc/}
    pid=${pid%/cmdline}
    [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
    cmd=$(tr '\0' ' ' 2>/dev/null <"$f") || continue
    for path; do
      if [[ $cmd == *"$path"* ]]; then
        echo "$pid"
        break
      fi
    done
  done
}
mounts_under() { # mount points at or under the given dirs, deepest first
  awk '{print $5}' /proc/self/mountinfo | while read -r m; do
    for d; do [[ $m == "$d" || $m == "$d"/* ]] && printf '%s %s\n' "${#m}" "$m"; done
  done | sort -rn | cut -d' ' -f2-
}
tap_name() { # peapod-sandboxer's TAP for a pod id (network.cc)
  $py -c 'import sys
h = 1469598103934665603
for c in sys.argv[1].encode(): h = ((h ^ c) * 1099511628211) % 2**64
print("pp%012x" % (h & 0xffffffffffff))' "$1"
}

cleanup() {
  local rc=$? pid i m pod c
  trap '' INT TERM
  set +e
  # bench.py tears down in order itself (pods through CRI first); this is the sweep after it.
  if [[ -n $bench_pid ]] && kill -0 "$bench_pid" 2>/dev/null; then
    kill -TERM "$bench_pid" 2>/dev/null
    for i in $(seq 600); do kill -0 "$bench_pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$bench_pid" 2>/dev/null
  fi
  if [[ -n $keep ]]; then
    mkdir -p "$keep"
    cp -a "$dir/logs/." "$keep/" 2>/dev/null
    for c in "$dir"/state/pods/*/console.log; do [[ -f $c ]] && cp "$c" "$keep/console-$(basename "$(dirname "$c")").log"; done
    log "logs kept in $keep"
  fi
  for i in 1 2 3; do
    pid=$(pids_naming "$dir" "$rundir")
    [[ -z $pid ]] && break
    kill -KILL $pid 2>/dev/null
    sleep 1
  done
  # runc containers of a shim that was killed (runc's root is ours: the run dir).
  if [[ -d $rundir/runc ]]; then
    for c in $(runc --root "$rundir/runc/k8s.io" list -q 2>/dev/null); do
      runc --root "$rundir/runc/k8s.io" delete -f "$c" 2>/dev/null
    done
  fi
  for i in 1 2 3 4 5; do
    m=$(mounts_under "$dir" "$rundir")
    [[ -z $m ]] && break
    while read -r m; do umount -l "$m" 2>/dev/null; done <<<"$m"
  done
  for pod in $(ls "$dir/state/pods" "$rundir/pods" 2>/dev/null | grep -E '^[0-9a-f]{64}$' | sort -u); do
    ip link del "$(tap_name "$pod")" 2>/dev/null
  done
  ip link del "ppbench$(basename "$dir" | cut -d- -f2 | tr 'A-Z' 'a-z' | cut -c1-6)" 2>/dev/null
  rm -rf --one-file-system "$dir" "$rundir"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- run

log "temporary root $dir (run dir $rundir), $repeat repeats, figures $figures, accel $accel"
# In the background and waited for, so that a signal reaches the trap at once.
$py bench/bench.py --dir "$dir" --rundir "$rundir" --src "$src" --build "$build" \
  --ctd-bin "$ctd_bin" --crictl "$crictl" --libvirt-root "$libvirt_root" \
  --out-prefix "$results/$stamp" --date "$stamp" --repeat "$repeat" \
  --density "$density" --exec-count "$exec_count" --accel "$accel" --figures "$figures" \
  $( ((quick)) && echo --quick) &
bench_pid=$!
rc=0
wait "$bench_pid" || rc=$?
bench_pid=
[[ -f $results/$stamp.json ]] || die "no results written (exit $rc)"
$py bench/report.py "$results/$stamp.json"
ln -sfn "$stamp.md" "$results/latest.md"
log "report: $results/$stamp.md (bench/results/latest.md)"
exit "$rc"
}
