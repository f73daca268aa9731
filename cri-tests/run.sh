#!/usr/bin/env bash
# critest (CRI conformance) against containerd 2.x with two runtime handlers, runc (the
# baseline) and peapod, and a Markdown report of the two side by side.
#
#   cri-tests/run.sh [--smoke] [--handlers runc,peapod] [--out FILE] [--keep DIR]
#                    [--build DIR] [--focus REGEX] [--hold]
#
#   --smoke          a short subset (pod and container lifecycle, exec, logs); the report goes to
#                    <build>/cri-tests/smoke.md unless --out says otherwise, and the exit status
#                    is non-zero if any test failed
#   --handlers LIST  comma-separated CRI runtime handlers to test, in order (default runc,peapod)
#   --out FILE       the report (default docs/conformance.md; for --smoke see above)
#   --keep DIR       copy the logs, configs and JUnit reports of the run into DIR before the
#                    temporary root is removed (containerd, sandboxer, registry, critest, VM
#                    consoles)
#   --build DIR      peapod's build dir (default build): sandboxer/, shim/, vm-images/
#   --focus REGEX    run only the critest specs matching REGEX (ginkgo focus), e.g. to retry one
#   --hold           set everything up, print how to reach it (crictl), run no tests and wait
#                    for Ctrl-C, then tear down: for debugging a handler by hand
#
# Everything lives under one temporary root (mktemp -d /tmp/pp-crit-XXXXXX) plus the
# sandboxer's short run dir (/run/pp-crit.XXXXXX): a Debian docker-registry on 127.0.0.1, a
# private containerd (unix sockets in the root), peapod-sandboxer, CNI state, critest's own temp
# dirs. On exit, failure, Ctrl-C or SIGTERM all of it is torn down: pods removed through CRI,
# every process started (and every shim or QEMU naming the root on its command line) killed,
# every mount under the root unmounted, the run's bridge, TAPs and iptables rules deleted, the
# directories removed. libvirt's embedded-driver root is /var/lib/peapod/critest-libvirt
# (kept: it caches libvirt's QEMU capability probe); a lock file there allows one run at a time.
#
# Environment: PEAPOD_ACCEL=kvm to boot pod VMs with KVM (default tcg).
set -euo pipefail
# The whole script is one brace group, read completely before it runs: editing this file while
# a (long) run is going cannot change what that run executes.
{

src=$(cd "$(dirname "$0")/.." && pwd)
cd "$src"

log() { printf '== %s\n' "$*" >&2; }
die() {
  printf 'cri-tests: error: %s\n' "$*" >&2
  exit 1
}

# ---------------------------------------------------------------- arguments

smoke=0
handlers=runc,peapod
out=
keep=
build=build
focus=
hold=0
while (($#)); do
  case $1 in
  --smoke) smoke=1 ;;
  --handlers) handlers=${2:?--handlers needs a value} && shift ;;
  --out) out=${2:?--out needs a value} && shift ;;
  --keep) keep=${2:?--keep needs a value} && shift ;;
  --build) build=${2:?--build needs a value} && shift ;;
  --focus) focus=${2:?--focus needs a value} && shift ;;
  --hold) hold=1 ;;
  -h | --help)
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
    exit 0
    ;;
  *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
IFS=, read -r -a handler_list <<<"$handlers"
for h in "${handler_list[@]}"; do
  [[ $h == runc || $h == peapod ]] || die "unknown handler '$h' (runc, peapod)"
done
want() { [[ ,$handlers, == *,$1,* ]]; }
if ((EUID != 0)); then
  echo "cri-tests: SKIPPED: needs root (containerd, netns, libvirt)" >&2
  exit 77 # CTest's skip code (tests/cri/CMakeLists.txt)
fi
build=$(cd "$build" 2>/dev/null && pwd) || die "build dir not found (make build, or --build DIR)"
if [[ -z $out ]]; then
  if ((smoke)); then out=$build/cri-tests/smoke.md; else out=$src/docs/conformance.md; fi
fi
mkdir -p "$(dirname "$out")"
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
if [[ -n $keep ]]; then
  mkdir -p "$keep"
  keep=$(cd "$keep" && pwd)
fi

# The smoke subset: ginkgo focus on the full spec text.
smoke_focus='PodSandbox runtime should support basic operations on PodSandbox'
smoke_focus+='|Container runtime should support basic operations on container runtime should support (creating|starting|stopping|removing running) container'
smoke_focus+='|runtime should support execSync \[Conformance\]'
smoke_focus+='|runtime should support starting container with log'
smoke_focus+='|runtime should support exec with tty=false and stdin=false'
smoke_focus+='|Runtime info'

# ---------------------------------------------------------------- prerequisites

[[ $(id -u) == 0 ]] || die "run as root (containerd, mounts, network, libvirt)"
registry_bin=/usr/bin/docker-registry
[[ -x $registry_bin ]] || die "$registry_bin missing: scripts/install-deps.sh --apt-only (Debian docker-registry)"
[[ -x /usr/lib/cni/bridge ]] || die "CNI plugins missing: scripts/install-deps.sh --apt-only"
for t in gcc curl iptables-save python3; do
  command -v "$t" >/dev/null || die "$t not found: scripts/install-deps.sh --apt-only"
done
if want runc; then command -v runc >/dev/null || die "runc not found: scripts/install-deps.sh --apt-only"; fi
if want peapod; then
  for f in sandboxer/peapod-sandboxer shim/containerd-shim-peapod-v2 vm-images/vmlinux \
    vm-images/initrd.img vm-images/cmdline; do
    [[ -e $build/$f ]] || die "$build/$f missing: make build"
  done
fi
# critest's networking tests map these host ports (pkg/validate/consts.go).
for port in 12000 12001 12002 12003; do
  if ss -Htln "sport = :$port" | grep -q .; then
    die "host port $port is in use; critest's port mapping tests need 12000-12003 free"
  fi
done

ctd_bin=$(scripts/go-tools.sh --print-path containerd)
crictl=$(scripts/go-tools.sh --print-path crictl)/crictl
critest=$(scripts/go-tools.sh --print-path critest)/critest

# One run at a time: the libvirt root (and the host ports above) are shared by all runs.
libvirt_root=/var/lib/peapod/critest-libvirt
mkdir -p "$libvirt_root"
exec {lock_fd}>"$libvirt_root.lock"
flock -n "$lock_fd" || die "another cri-tests/run.sh holds $libvirt_root.lock"

# ---------------------------------------------------------------- the temporary root, teardown

dir=$(mktemp -d /tmp/pp-crit-XXXXXX)
chmod 711 "$dir"  # pod VMs (QEMU as uids of their own) pass through to their disks
# Pod sockets live under run_dir, which must stay short (config.cc: at most 23 characters).
rundir=$(mktemp -d /run/pp-crit.XXXXXX)
tag=${dir##*-}                        # the run's random suffix: names its bridge and network
bridge=ppcrit${tag:0:6}               # IFNAMSIZ: at most 15 characters
netname=pp-crit-$tag
subnet=10.93.$((RANDOM % 250)).0/24
mkdir -p "$dir/logs" "$dir/tmp" "$dir/results"
touch "$dir/started"
pids=()          # daemons we started, stopped in reverse order
critest_pid=
ctr="$ctd_bin/ctr --address $dir/containerd.sock"
had_hostport_chains=0 # CNI portmap's shared iptables chains existed before this run
iptables -t nat -S CNI-HOSTPORT-DNAT >/dev/null 2>&1 && had_hostport_chains=1

# PIDs whose command line names one of the given paths (shims, QEMU, anything we spawned).
pids_naming() {
  local f pid cmd path
  for f in /proc/[0-9]*/cmdline; do
    pid=${f#/proc/}
    pid=${pid%/cmdline}
    [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
    cmd=$({ tr '\0' ' ' <"$f"; } 2>/dev/null) || continue
    for path; do
      if [[ $cmd == *"$path"* ]]; then
        echo "$pid"
        break
      fi
    done
  done
}

# Mount points at or under the given dirs, deepest first.
mounts_under() {
  awk '{print $5}' /proc/self/mountinfo | while read -r m; do
    for d; do [[ $m == "$d" || $m == "$d"/* ]] && printf '%s %s\n' "${#m}" "$m"; done
  done | sort -rn | cut -d' ' -f2-
}

# stop_pid PID [SECONDS]: SIGTERM, then SIGKILL if it has not exited after SECONDS.
stop_pid() {
  local pid=$1 secs=${2:-10} i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < secs * 5; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  kill -KILL "$pid" 2>/dev/null
}

# --keep: the consoles of pod VMs still there (before their pods are removed), then the rest.
keep_consoles() {
  local f
  for f in "$dir"/state/pods/*/console.log; do
    [[ -f $f ]] && mkdir -p "$keep/consoles" && cp "$f" "$keep/consoles/$(basename "$(dirname "$f")").log"
  done
}
keep_logs() {
  log "keeping logs in $keep"
  cp -a "$dir/logs/." "$dir/results/." "$keep/" 2>/dev/null
  cp "$dir"/*.toml "$dir"/*.json "$dir"/*.yml "$dir"/*.yaml "$dir"/*.txt "$keep/" 2>/dev/null
  cp -a "$dir/net.d" "$dir/certs.d" "$keep/" 2>/dev/null
  keep_consoles
  # libvirt's logs of this run's domains (QEMU's own messages, one per pod).
  mkdir -p "$keep/libvirt"
  find "$libvirt_root" -name '*.log' -newer "$dir/started" -exec cp {} "$keep/libvirt/" \; 2>/dev/null
}

cleanup() {
  local rc=$? pid pod m i
  trap '' INT TERM # finish tearing down even if interrupted again
  set +e
  log "tearing down $dir"
  [[ -n $critest_pid ]] && stop_pid "$critest_pid" 5
  [[ -n $keep ]] && keep_consoles
  # Pods first, through CRI: CNI DEL frees addresses and iptables rules, the sandboxer stops VMs.
  if [[ -f $dir/crictl.yaml ]] && kill -0 "${ctd_pid:-0}" 2>/dev/null; then
    for pod in $(CRI_CONFIG_FILE=$dir/crictl.yaml timeout 30 "$crictl" pods -q 2>/dev/null); do
      CRI_CONFIG_FILE=$dir/crictl.yaml timeout 120 "$crictl" rmp -f "$pod" >/dev/null 2>&1
    done
  fi
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop_pid "${pids[$i]}" 15; done
  for pid in $(ps -o pid= --ppid "$$"); do
    [[ $pid != "$BASHPID" ]] && { kill -KILL "$pid" && wait "$pid"; } 2>/dev/null
  done
  [[ -n $keep ]] && keep_logs
  # What they left: shims, QEMUs, critest's children; all name the root or run dir.
  for i in 1 2 3; do
    pid=$(pids_naming "$dir" "$rundir")
    [[ -z $pid ]] && break
    # shellcheck disable=SC2086 # one or more pids
    kill -KILL $pid 2>/dev/null
    sleep 1
  done
  # Overlay rootfs, shm, netns bind mounts (netns_mounts_under_state_dir), pod shares, volumes.
  for i in 1 2 3 4 5; do
    m=$(mounts_under "$dir" "$rundir")
    [[ -z $m ]] && break
    while read -r m; do umount -l "$m" 2>/dev/null; done <<<"$m"
  done
  # A pod whose VM was never shut down may leave its TAP in this netns (network.cc TapName).
  for pod in "$dir"/state/pods/* "$rundir"/pods/*; do
    pod=${pod##*/}
    [[ $pod =~ ^[0-9a-f]{64}$ ]] && ip link del "$(tap_name "$pod")" 2>/dev/null
  done
  ip link del "$bridge" 2>/dev/null
  delete_iptables_rules
  # libvirt's per-domain QEMU logs of this run (copied first with --keep).
  find "$libvirt_root/log" -name 'peapod-*.log' -newer "$dir/started" -delete 2>/dev/null
  rm -rf --one-file-system "$dir" "$rundir"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# peapod-sandboxer's TAP name for a pod id: "pp" + 48 bits of its FNV-1a hash.
tap_name() {
  python3 -c 'import sys
h = 1469598103934665603
for c in sys.argv[1].encode(): h = ((h ^ c) * 1099511628211) % 2**64
print("pp%012x" % (h & 0xffffffffffff))' "$1"
}

# The CNI plugins tag their iptables rules with the network name in a comment; remove those,
# then the per-pod chains they jumped to.
delete_iptables_rules() {
  local table rule chains=() c
  for table in nat filter; do
    while read -r rule; do
      [[ -z $rule ]] && continue
      c=$(sed -n 's/.* -j \(CNI-[0-9a-f]\{24\}\).*/\1/p' <<<"$rule")
      [[ -n $c ]] && chains+=("$table $c")
      eval "iptables -t $table -D ${rule#-A }" 2>/dev/null
    done < <(iptables-save -t "$table" 2>/dev/null | grep -F -- "$netname" | grep '^-A ')
  done
  for c in "${chains[@]}"; do
    iptables -t "${c% *}" -F "${c#* }" 2>/dev/null
    iptables -t "${c% *}" -X "${c#* }" 2>/dev/null
  done
  # portmap's shared chains: removed if this run created them and no one else has rules there.
  if ((!had_hostport_chains)) && [[ $(iptables -t nat -S CNI-HOSTPORT-DNAT 2>/dev/null) == "-N CNI-HOSTPORT-DNAT" ]]; then
    iptables -t nat -D PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT 2>/dev/null
    iptables -t nat -D OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT 2>/dev/null
    iptables -t nat -D POSTROUTING -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ 2>/dev/null
    for c in CNI-HOSTPORT-DNAT CNI-HOSTPORT-MASQ CNI-HOSTPORT-SETMARK; do
      iptables -t nat -F "$c" 2>/dev/null
      iptables -t nat -X "$c" 2>/dev/null
    done
  fi
}

# ---------------------------------------------------------------- images and registry

log "temporary root $dir (run dir $rundir)"
log "building the test images from Debian packages"
cri-tests/make-images.sh "$dir/images"

# A free loopback port (the kernel picks it; nothing else should take it in the next second).
registry_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
registry=127.0.0.1:$registry_port
cat >"$dir/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/registry
  delete:
    enabled: true
http:
  addr: $registry
EOF
log "starting docker-registry on $registry"
"$registry_bin" serve "$dir/registry.yml" >"$dir/logs/registry.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -fs "http://$registry/v2/" >/dev/null && break; sleep 0.2; done
curl -fs "http://$registry/v2/" >/dev/null || { cat "$dir/logs/registry.log"; die "registry did not start"; }

# containerd pulls registry.k8s.io, gcr.io and the registry itself from the loopback registry.
for host in registry.k8s.io gcr.io "$registry"; do
  mkdir -p "$dir/certs.d/$host"
  cat >"$dir/certs.d/$host/hosts.toml" <<EOF
server = "http://$registry"
[host."http://$registry"]
  capabilities = ["pull", "resolve", "push"]
EOF
done

# ---------------------------------------------------------------- peapod-sandboxer

if want peapod; then
  # A copy of the binaries and guest image: a rebuild during the run must not change them.
  mkdir -p "$dir/peapod/bin" "$dir/peapod/vm-images"
  cp "$build/sandboxer/peapod-sandboxer" "$build/shim/containerd-shim-peapod-v2" "$dir/peapod/bin/"
  cp "$build"/vm-images/{vmlinux,initrd.img,cmdline} "$dir/peapod/vm-images/"
  accel=tcg
  [[ ${PEAPOD_ACCEL:-} == kvm ]] && accel=kvm
  cat >"$dir/sandboxer.json" <<EOF
{"listen": "$dir/sandboxer.sock", "shim_listen": "$dir/shim.sock", "state_dir": "$dir/state",
 "run_dir": "$rundir", "libvirt_root": "$libvirt_root",
 "cri_root": "$dir/ctd-root/io.containerd.grpc.v1.cri",
 "image_dir": "$dir/peapod/vm-images", "accel": "$accel"}
EOF
  log "starting peapod-sandboxer (accel $accel; the first run on a machine probes QEMU, ~80 s under TCG)"
  "$dir/peapod/bin/peapod-sandboxer" --config "$dir/sandboxer.json" >"$dir/logs/sandboxer.log" 2>&1 &
  pids+=($!)
  sandboxer_pid=$!
  for _ in $(seq 1500); do
    [[ -S $dir/shim.sock ]] && break
    kill -0 "$sandboxer_pid" 2>/dev/null || break
    sleep 0.2
  done
  [[ -S $dir/shim.sock ]] || { tail -30 "$dir/logs/sandboxer.log"; die "peapod-sandboxer did not start"; }
fi

# ---------------------------------------------------------------- containerd

# Without CAP_SYS_RESOURCE (some sandboxed CI hosts drop it) no process may lower its OOM score,
# and runc fails every pause container (oom_score_adj -998): keep scores >= containerd's.
restrict_oom=false
if (((0x$(awk '/^CapEff/ {print $2}' /proc/self/status) >> 24 & 1) == 0)); then
  restrict_oom=true
  log "no CAP_SYS_RESOURCE here: containerd's restrict_oom_score_adj = true"
fi
mkdir -p "$dir/net.d"
cat >"$dir/net.d/10-$netname.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "$netname", "plugins": [
  {"type": "bridge", "bridge": "$bridge", "isGateway": true, "ipMasq": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$subnet"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$dir/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}},
  {"type": "loopback"}]}
EOF
# The one containerd config template (scripts/containerd-config.sh). Streaming (exec, attach,
# port-forward) on loopback, a port of the kernel's choosing; pod netns bind mounts under the
# state dir, not /run/netns: torn down with the root.
config=(--containerd 2 --dir "$dir" --debug info --streaming-on-loopback
  --pause registry.k8s.io/pause:3.10.1 --registry-config "$dir/certs.d" --netns-under-state
  --restrict-oom "$restrict_oom" --cni-conf "$dir/net.d" --default-runtime runc
  --runc "$(command -v runc || echo runc)")
if want peapod; then config+=(--sandboxer "$dir/sandboxer.sock"); fi
"$src/scripts/containerd-config.sh" "${config[@]}" >"$dir/containerd.toml"
log "starting containerd $("$ctd_bin/containerd" --version | awk '{print $3}')"
# The peapod shims put their sockets in PEAPOD_SHIM_SOCKET_DIR (default /run/peapod/shims).
mkdir -p "$rundir/shims"
PATH="$dir/peapod/bin:$ctd_bin:$PATH" PEAPOD_SANDBOXER_SOCKET="$dir/shim.sock" \
  PEAPOD_SHIM_SOCKET_DIR="$rundir/shims" "$ctd_bin/containerd" --config "$dir/containerd.toml" >"$dir/logs/containerd.log" 2>&1 &
pids+=($!)
ctd_pid=$!
for _ in $(seq 150); do $ctr version >/dev/null 2>&1 && break; sleep 0.2; done
$ctr version >/dev/null 2>&1 || { tail -30 "$dir/logs/containerd.log"; die "containerd did not start"; }
cat >"$dir/crictl.yaml" <<EOF
runtime-endpoint: unix://$dir/containerd.sock
image-endpoint: unix://$dir/containerd.sock
timeout: 120
EOF
for _ in $(seq 100); do
  CRI_CONFIG_FILE=$dir/crictl.yaml "$crictl" info >/dev/null 2>&1 && break
  sleep 0.3
done

# Push the images through this containerd (namespace "push", emptied afterwards so that
# critest's pulls really come from the registry).
log "pushing $(wc -l <"$dir/images/images.txt") images to the registry"
$ctr -n push images import --no-unpack "$dir/images/images.tar" >/dev/null 2>>"$dir/logs/push.log"
while read -r ref; do
  $ctr -n push images push --plain-http "$registry/${ref#*/}" "$ref" >>"$dir/logs/push.log" 2>&1 ||
    { tail -5 "$dir/logs/push.log"; die "pushing $ref failed"; }
done <"$dir/images/images.txt"
# shellcheck disable=SC2046 # one argument per image
$ctr -n push images rm $($ctr -n push images ls -q 2>/dev/null) >/dev/null 2>>"$dir/logs/push.log"

# critest's two overridable images, named by the registry's own address.
cat >"$dir/test-images.yaml" <<EOF
defaultTestContainerImage: $registry/e2e-test-images/busybox:1.29-2
webServerTestImage: $registry/e2e-test-images/nginx:1.14-2
EOF

if ((hold)); then
  log "holding (Ctrl-C tears down). Try:"
  printf '  export CRI_CONFIG_FILE=%s/crictl.yaml PATH=%s:%s:$PATH\n' "$dir" "$(dirname "$crictl")" "$ctd_bin" >&2
  printf '  crictl runp --runtime peapod pod.json   # images: %s/images/images.txt, registry %s\n' "$dir" "$registry" >&2
  printf '  logs: %s/logs\n' "$dir" >&2
  while :; do sleep 3600 & wait $! || true; done
fi

# ---------------------------------------------------------------- skips

# Skipped for every handler: what this machine or the offline registry cannot provide.
# Format of both skip files: <regex on the spec text><TAB><reason>.
{
  printf '%s\t%s\n' 'public image with digest should be pulled and removed' \
    'needs gcr.io/k8s-staging-cri-tools/test-image-digest@sha256:9700f9…, whose content is fixed by its digest; the run is offline and cannot rebuild it'
  if [[ $(cat /sys/module/apparmor/parameters/enabled 2>/dev/null) != Y* ]]; then
    printf '%s\t%s\n' '\[k8s\.io\] AppArmor' 'AppArmor is not enabled on this host'
  fi
  # (critest registers its SELinux specs only where SELinux is enabled: nothing to skip.)
} >"$dir/common-skips.txt"
if [[ -d /sys/fs/selinux ]]; then
  log "note: SELinux is enabled on this host; critest runs its SELinux specs"
fi

skip_args() { # FILE...: --ginkgo.skip per regex
  local f re
  for f; do
    while IFS=$'\t' read -r re _; do
      [[ -z $re || $re == \#* ]] && continue
      printf -- '--ginkgo.skip=%s\n' "$re"
    done <"$f"
  done
}

# ---------------------------------------------------------------- critest

seed=$(date +%s) # one spec order for all handlers
run_focus=$focus
((smoke)) && [[ -z $run_focus ]] && run_focus=$smoke_focus
results=()
for h in "${handler_list[@]}"; do
  args=(
    --runtime-endpoint "unix://$dir/containerd.sock"
    --image-endpoint "unix://$dir/containerd.sock"
    --config "$dir/crictl.yaml"
    --runtime-handler "$h"
    --test-images-file "$dir/test-images.yaml"
    --ginkgo.junit-report "$dir/results/junit-$h.xml"
    --ginkgo.seed "$seed"
    --ginkgo.timeout 8h
    --ginkgo.no-color
  )
  [[ -n $run_focus ]] && args+=(--ginkgo.focus "$run_focus")
  mapfile -t skips < <(skip_args "$dir/common-skips.txt")
  [[ $h == peapod ]] && mapfile -t -O "${#skips[@]}" skips < <(skip_args cri-tests/peapod-skips.txt)
  args+=("${skips[@]}")
  log "critest --runtime-handler $h (log: $dir/logs/critest-$h.log)"
  start=$(date +%s)
  # In the background and waited for, so that Ctrl-C reaches the trap at once. TMPDIR keeps
  # critest's host paths (volumes, logs, propagation mounts) inside the root.
  TMPDIR=$dir/tmp "$critest" "${args[@]}" >"$dir/logs/critest-$h.log" 2>&1 &
  critest_pid=$!
  wait "$critest_pid" || true
  critest_pid=
  secs=$(($(date +%s) - start))
  summary=$(grep -a -E '^(Ran [0-9]+ of|(SUCCESS|FAIL)! )' "$dir/logs/critest-$h.log" | tr '\n' ' ')
  log "$h: ${summary:-no summary (see the log)} in $((secs / 60)) min $((secs % 60)) s"
  [[ -f $dir/results/junit-$h.xml ]] || die "critest wrote no JUnit report for $h (tail of its log above)"
  results+=("$h=$dir/results/junit-$h.xml:$secs")
done

# ---------------------------------------------------------------- report

report_args=(--out "$out" --common-skips "$dir/common-skips.txt" --peapod-skips cri-tests/peapod-skips.txt)
((smoke)) && report_args+=(--title "CRI conformance: smoke subset")
[[ -n $focus ]] && report_args+=(--note "Only the specs matching --focus '$focus' were run.")
[[ -n $run_focus ]] && report_args+=(--only "$run_focus")
for r in "${results[@]}"; do report_args+=(--junit "$r"); done
report_args+=(
  --version "containerd=$("$ctd_bin/containerd" --version | awk '{print $3}')"
  --version "critest=$("$critest" --version 2>/dev/null | sed -n 's/^critest version: //p' | head -n 1)"
  --version "crictl=$("$crictl" --version | awk '{print $3}')"
  --version "runc=$(runc --version 2>/dev/null | awk 'NR==1 {print $3}')"
  --version "peapod=$(git -C "$src" describe --always --dirty 2>/dev/null || echo unknown)"
  --version "qemu=$(qemu-system-x86_64 --version 2>/dev/null | awk 'NR==1 {print $4}')"
  --version "accel=${accel:-n/a}"
  --version "host kernel=$(uname -r)"
  --version "ginkgo seed=$seed"
)
python3 cri-tests/report.py "${report_args[@]}"
log "report: $out"

if ((smoke)); then
  python3 cri-tests/report.py --check-no-failures "${results[@]/#/--junit=}" || exit 1
fi
exit 0
}
