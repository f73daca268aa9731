#!/usr/bin/env bash
# `make demo`: a Kubernetes-style pod through real containerd 2.x and peapod, end to end.
#
# Starts peapod-sandboxer and a private containerd 2.x (built from the Go module proxy by
# scripts/go-tools.sh) whose CRI handler "peapod" uses the sandboxer through the sandbox API;
# imports busybox and pause images built here from Debian's busybox-static; then with crictl:
# runp a pod, start two containers in it, and show that they share one kernel (same boot id)
# that is not the host's. Everything lives under a temporary directory and is removed at the
# end, also on failure or Ctrl-C.
set -euo pipefail
build=$(cd "${1:-build}" && pwd)
cd "$(dirname "$0")/.."
src=$(pwd)

ctd_bin=$(scripts/go-tools.sh --print-path containerd)
crictl=$(scripts/go-tools.sh --print-path crictl)/crictl
dir=$(mktemp -d /tmp/ppdemo-XXXXXX)  # short: pod sockets live under it
chmod 711 "$dir"  # pod VMs (QEMU as uids of their own) pass through to their disks
pids=()
cleanup() {
  set +e
  if [[ -f "$dir/crictl.yaml" ]]; then
    for p in $(CRI_CONFIG_FILE=$dir/crictl.yaml "$crictl" pods -q 2>/dev/null); do
      CRI_CONFIG_FILE=$dir/crictl.yaml "$crictl" stopp "$p" >/dev/null 2>&1
      CRI_CONFIG_FILE=$dir/crictl.yaml "$crictl" rmp -f "$p" >/dev/null 2>&1
    done
  fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  sleep 2
  pkill -9 -f "$dir" 2>/dev/null
  grep -o " $dir[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null
  ip link del ppdemo0 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM

echo "== building test images from busybox-static"
tests/cri/make-images.sh "$dir/images"

echo "== starting peapod-sandboxer (libvirt embedded driver; TCG unless KVM works)"
accel=tcg
[[ "${PEAPOD_ACCEL:-}" == kvm ]] && accel=kvm
cat > "$dir/sandboxer.json" <<EOF
{"listen": "$dir/sandboxer.sock", "shim_listen": "$dir/shim.sock", "state_dir": "$dir/state",
 "run_dir": "$dir/run", "libvirt_root": "/var/lib/peapod/demo-libvirt",
 "cri_root": "$dir/ctd-root/io.containerd.grpc.v1.cri",
 "image_dir": "$build/vm-images", "accel": "$accel"}
EOF
"$build/sandboxer/peapod-sandboxer" --config "$dir/sandboxer.json" > "$dir/sandboxer.log" 2>&1 &
pids+=($!)
disown
for _ in $(seq 600); do [[ -S "$dir/shim.sock" ]] && break; sleep 0.2; done
[[ -S "$dir/shim.sock" ]] || { cat "$dir/sandboxer.log"; exit 1; }

echo "== starting containerd $("$ctd_bin/containerd" --version | awk '{print $3}') with the peapod sandboxer"
"$src/scripts/containerd-config.sh" --containerd 2 --dir "$dir" --sandboxer "$dir/sandboxer.sock" \
  --pause registry.local/peapod/pause:test --cni-conf "$dir/net.d" > "$dir/containerd.toml"
mkdir -p "$dir/net.d" "$dir/logs"
cat > "$dir/net.d/10-demo.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "peapod-demo", "plugins": [{"type": "bridge", "bridge": "ppdemo0",
 "isGateway": true, "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.96.77.0/24"}]],
 "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$dir/ipam"}}]}
EOF
PATH="$build/shim:$ctd_bin:$PATH" PEAPOD_SANDBOXER_SOCKET="$dir/shim.sock" \
  "$ctd_bin/containerd" --config "$dir/containerd.toml" > "$dir/containerd.log" 2>&1 &
pids+=($!)
disown
ctr="$ctd_bin/ctr --address $dir/containerd.sock -n k8s.io"
for _ in $(seq 100); do $ctr version >/dev/null 2>&1 && break; sleep 0.2; done
$ctr images import "$dir/images/busybox.tar" >/dev/null 2>&1
$ctr images import "$dir/images/pause.tar" >/dev/null 2>&1
printf 'runtime-endpoint: unix://%s/containerd.sock\nimage-endpoint: unix://%s/containerd.sock\ntimeout: 120\n' \
  "$dir" "$dir" > "$dir/crictl.yaml"
cri() { CRI_CONFIG_FILE=$dir/crictl.yaml "$crictl" "$@" 2> >(grep -v 'level=warning' >&2); }
for _ in $(seq 100); do cri version >/dev/null 2>&1 && break; sleep 0.3; done

cat > "$dir/pod.json" <<EOF
{"metadata": {"name": "demo", "namespace": "default", "uid": "peapod-demo", "attempt": 0},
 "hostname": "demo", "log_directory": "$dir/logs", "linux": {}}
EOF
for c in c1 c2; do
  cat > "$dir/$c.json" <<EOF
{"metadata": {"name": "$c"}, "image": {"image": "docker.io/peapod/busybox:test"},
 "command": ["sh", "-c", "echo $c up; sleep 3600"], "log_path": "$c.log", "linux": {}}
EOF
done

echo "== crictl runp --runtime peapod (boots the pod's VM)"
start=$(date +%s.%N)
pod=$(cri runp --runtime peapod "$dir/pod.json")
printf 'pod %s ready in %.1f s\n' "${pod:0:13}" "$(echo "$(date +%s.%N) - $start" | bc)"
ids=()
for c in c1 c2; do
  id=$(cri create "$pod" "$dir/$c.json" "$dir/pod.json")
  cri start "$id" >/dev/null
  ids+=("$id")
done
cri ps

echo "== what each container sees"
echo "host:  kernel $(uname -r), boot id $(cat /proc/sys/kernel/random/boot_id)"
for i in 0 1; do
  echo "c$((i + 1)):    kernel $(cri exec -s "${ids[$i]}" uname -r | tr -d '\r\n'), boot id $(cri exec -s "${ids[$i]}" cat /proc/sys/kernel/random/boot_id | tr -d '\r\n'), ip $(cri exec -s "${ids[$i]}" sh -c "ip -4 -o addr show eth0 | awk '{print \$4}'" | tr -d '\r\n')"
done
echo "(same boot id in both containers: one VM kernel for the pod, not the host's)"
cri logs "${ids[0]}"

echo "== crictl stopp / rmp"
cri stopp "$pod" >/dev/null && cri rmp "$pod" >/dev/null && echo "pod removed"
