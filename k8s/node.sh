#!/usr/bin/env bash
# A one-node Kubernetes on this machine, on loopback, from the release k8s/build.sh builds: etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler and kubelet, over containerd 2.x
# configured the way `make install` configures a node (its drop-in in /etc/containerd/conf.d)
# and the installed peapod-sandboxer under peapod-supervise. RuntimeClass "peapod" is applied.
#
#   k8s/node.sh up [--dir DIR] [--default-runtime peapod|runc] [--stop-after SECONDS]
#   k8s/node.sh down [--dir DIR]
#   k8s/node.sh restart-kubelet [--dir DIR]
#
#   up      starts everything, waits for the node to be Ready, prints `export KUBECONFIG=...`
#   down    deletes the pods, stops everything it started and removes DIR
#   --dir DIR              where everything lives (default /tmp/ppk8s; keep it short: sockets)
#   --default-runtime R    containerd's default runtime handler (default runc; peapod for the
#                          node conformance run, so that every pod is a VM)
#   --stop-after SECONDS   a watchdog runs `down` after this long (default 7200): nothing
#                          started here outlives a forgotten node
#
# Needs: `make install` done (peapod-sandboxer, the shim, the guest, the containerd drop-in),
# root, the Go tools (scripts/go-tools.sh containerd), the Kubernetes binaries (k8s/build.sh).
# Test images (busybox, pause) are built from Debian's busybox-static and imported, so pods use
# imagePullPolicy: Never (or IfNotPresent) and nothing is pulled.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
cmd=${1:-}
shift || true
dir=/tmp/ppk8s default_runtime=runc stop_after=7200
while (($#)); do
  case $1 in
  --dir) dir=${2:?} && shift ;;
  --default-runtime) default_runtime=${2:?} && shift ;;
  --stop-after) stop_after=${2:?} && shift ;;
  -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//' && exit 0 ;;
  *) echo "node.sh: unknown argument '$1' (see --help)" >&2 && exit 2 ;;
  esac
  shift
done
log() { echo "node.sh: $*" >&2; }
die() { log "$*"; exit 1; }
node=peapod-node
# The node's address: kubelet refuses a loopback node IP, so the node gets one of its own on a
# device of its own (reachable from this host and its pods only; no route leads to it from
# outside).
node_link=ppk8s-node node_ip=10.99.99.1
kubectl_() { "$kbin/kubectl" --kubeconfig "$dir/admin.kubeconfig" "$@"; }

# ---------------------------------------------------------------- down

down() {
  [[ -d $dir ]] || return 0
  kbin=$(cat "$dir/kbin" 2>/dev/null || true)
  if [[ -n $kbin && -S $dir/containerd.sock ]]; then
    # Pods first, through kubelet's runtime: their VMs and shims go with them.
    local crictl
    crictl=$("$repo/scripts/go-tools.sh" --print-path crictl 2>/dev/null)/crictl || true
    if [[ -x $crictl ]]; then
      kill_by_pidfile kubelet
      for p in $("$crictl" -r "unix://$dir/containerd.sock" pods -q 2>/dev/null); do
        "$crictl" -r "unix://$dir/containerd.sock" stopp "$p" >/dev/null 2>&1 || true
        "$crictl" -r "unix://$dir/containerd.sock" rmp -f "$p" >/dev/null 2>&1 || true
      done
    fi
  fi
  for c in kubelet kube-scheduler kube-controller-manager kube-apiserver etcd containerd \
    peapod-supervise watchdog; do
    kill_by_pidfile "$c"
  done
  ip link del "$node_link" 2>/dev/null || true
  # The CNI bridge keeps the pod network's gateway address; left behind, it would route
  # 10.94.0.0/24 for the next user of the host.
  ip link del ppk8s0 2>/dev/null || true
  # Mounts kubelet and containerd left below the dir, then the dir.
  { grep -o " $dir/[^ ]*" /proc/self/mountinfo || true; } | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  rm -rf "$dir"
  log "down"
}

kill_by_pidfile() {
  local f=$dir/$1.pid pid
  [[ -f $f ]] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

# start NAME CMD... : runs CMD in the background, logging to DIR/NAME.log.
start() {
  local name=$1
  shift
  "$@" >"$dir/$name.log" 2>&1 &
  echo $! >"$dir/$name.pid"
}

# wait_for WHAT SECONDS CMD...: until CMD succeeds.
wait_for() {
  local what=$1 secs=$2
  shift 2
  for _ in $(seq $((secs * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "$what did not come up in ${secs}s (logs in $dir)"
}

# ---------------------------------------------------------------- certificates

pki() {
  local p=$dir/pki
  mkdir -p "$p"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=peapod-test-ca \
    -keyout "$p/ca.key" -out "$p/ca.crt" 2>/dev/null
  # cert NAME SUBJECT [SANS]
  cert() {
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$p/$1.key" -out "$p/$1.csr" 2>/dev/null
    local ext=$p/$1.ext
    echo "basicConstraints=CA:FALSE" >"$ext"
    [[ -z ${3:-} ]] || echo "subjectAltName=$3" >>"$ext"
    openssl x509 -req -in "$p/$1.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial \
      -days 2 -extfile "$ext" -out "$p/$1.crt" 2>/dev/null
  }
  cert apiserver /CN=kube-apiserver \
    "IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert admin "/O=system:masters/CN=peapod-admin"
  cert kubelet "/O=system:nodes/CN=system:node:$node"
  openssl genrsa -out "$p/sa.key" 2048 2>/dev/null
  # A bearer token for the node conformance suite (it authenticates no other way).
  echo "$(openssl rand -hex 16),peapod-e2e,peapod-e2e,\"system:masters\"" >"$p/tokens.csv"
  openssl rsa -in "$p/sa.key" -pubout -out "$p/sa.pub" 2>/dev/null
}

kubeconfig() { # NAME CERT
  cat >"$dir/$1.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "https://127.0.0.1:6443", certificate-authority: "$dir/pki/ca.crt"}
users:
- name: u
  user: {client-certificate: "$dir/pki/$2.crt", client-key: "$dir/pki/$2.key"}
contexts:
- name: c
  context: {cluster: local, user: u}
current-context: c
KC
}

start_kubelet() {
  start kubelet "$kbin/kubelet" --config="$dir/kubelet.yaml" --kubeconfig="$dir/kubelet.kubeconfig" \
    --root-dir="$dir/kubelet" --hostname-override="$node" --node-ip="$node_ip" --v=2
}

# kubelet killed (-9) and started again, as a node's service restart would.
restart_kubelet() {
  kbin=$(cat "$dir/kbin")
  local pid
  pid=$(cat "$dir/kubelet.pid")
  kill -KILL "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  mv "$dir/kubelet.log" "$dir/kubelet.log.1"
  start_kubelet
  log "kubelet restarted"
}

# ---------------------------------------------------------------- up

up() {
  [[ $(id -u) == 0 ]] || die "needs root"
  [[ ! -e $dir ]] || die "$dir exists: a node is up (k8s/node.sh down --dir $dir first)"
  command -v peapod-sandboxer >/dev/null || die "peapod-sandboxer is not installed: make install"
  [[ -f /etc/containerd/conf.d/peapod.toml ]] || die "no /etc/containerd/conf.d/peapod.toml: make install"
  kbin=$("$here/build.sh" --print-dir)
  local ctd
  ctd=$("$repo/scripts/go-tools.sh" --print-path containerd)
  mkdir -p "$dir"/{net.d,images,kubelet,etcd,manifests}
  echo "$kbin" >"$dir/kbin"
  trap 'log "failed; tearing down"; down' ERR

  # A watchdog: the node goes down by itself after stop_after seconds.
  (sleep "$stop_after" && "$0" down --dir "$dir") >/dev/null 2>&1 &
  echo $! >"$dir/watchdog.pid"

  ip link del "$node_link" 2>/dev/null || true
  # (a veth pair: the kernel may have no dummy driver; the other end stays unused)
  ip link add "$node_link" type veth peer name "${node_link}p"
  ip addr add "$node_ip/32" dev "$node_link"
  ip link set "${node_link}p" up
  ip link set "$node_link" up
  pki
  kubeconfig admin admin
  kubeconfig kubelet kubelet

  # peapod: the installed unit's command, supervised (systemd is not PID 1 here).
  if ! [[ -S /run/peapod/sandboxer.sock ]] || ! pgrep -x peapod-sandbox >/dev/null; then
    start peapod-supervise peapod-supervise
    wait_for peapod-sandboxer 120 test -S /run/peapod/sandboxer.sock
  fi

  # containerd 2.x, its peapod runtime from the installed drop-in.
  cat >"$dir/net.d/10-ppk8s.conflist" <<NET
{"cniVersion": "1.0.0", "name": "ppk8s", "plugins": [
  {"type": "bridge", "bridge": "ppk8s0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.94.0.0/24"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
NET
  # Without CAP_SYS_RESOURCE (sandboxed CI hosts drop it) no process may lower its OOM score,
  # and runc fails every pause container (oom_score_adj -998): keep scores >= containerd's.
  local restrict_oom=false
  if (((0x$(awk '/^CapEff/ {print $2}' /proc/self/status) >> 24 & 1) == 0)); then
    restrict_oom=true
  fi
  # containerd's own root and state, as on a node: peapod writes the pod files where its CRI
  # looks for them (the sandboxer's cri_root default).
  "$repo/scripts/containerd-config.sh" --containerd 2 --dir "$dir" --root /var/lib/containerd \
    --state /run/containerd \
    --imports "/etc/containerd/conf.d/*.toml" --pause registry.local/peapod/pause:test \
    --cni-conf "$dir/net.d" --runc /usr/sbin/runc --default-runtime "$default_runtime" \
    --streaming-on-loopback --restrict-oom "$restrict_oom" >"$dir/containerd.toml"
  start containerd env PATH="$ctd:$PATH" "$ctd/containerd" --config "$dir/containerd.toml"
  wait_for containerd 60 "$ctd/ctr" -a "$dir/containerd.sock" version
  "$repo/tests/cri/make-images.sh" "$dir/images" >/dev/null
  for img in busybox pause; do
    "$ctd/ctr" -a "$dir/containerd.sock" -n k8s.io images import "$dir/images/$img.tar" >/dev/null
  done

  # The control plane.
  start etcd "$kbin/etcd" --data-dir "$dir/etcd"
  wait_for etcd 60 bash -c "exec 3<>/dev/tcp/127.0.0.1/2379"
  start kube-apiserver "$kbin/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=127.0.0.1 --secure-port=6443 --advertise-address=127.0.0.1 \
    --endpoint-reconciler-type=none --service-cluster-ip-range=10.96.0.0/24 \
    --kubelet-preferred-address-types=InternalIP \
    --client-ca-file="$dir/pki/ca.crt" --tls-cert-file="$dir/pki/apiserver.crt" \
    --tls-private-key-file="$dir/pki/apiserver.key" \
    --kubelet-client-certificate="$dir/pki/admin.crt" --kubelet-client-key="$dir/pki/admin.key" \
    --service-account-key-file="$dir/pki/sa.pub" \
    --service-account-signing-key-file="$dir/pki/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --authorization-mode=Node,RBAC --allow-privileged=true --token-auth-file="$dir/pki/tokens.csv"
  wait_for kube-apiserver 120 kubectl_ get --raw /readyz
  start kube-controller-manager "$kbin/kube-controller-manager" \
    --kubeconfig="$dir/admin.kubeconfig" --bind-address=127.0.0.1 --leader-elect=false \
    --service-account-private-key-file="$dir/pki/sa.key" --root-ca-file="$dir/pki/ca.crt" \
    --cluster-signing-cert-file="$dir/pki/ca.crt" --cluster-signing-key-file="$dir/pki/ca.key" \
    --use-service-account-credentials=true
  start kube-scheduler "$kbin/kube-scheduler" --kubeconfig="$dir/admin.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false

  # kubelet.
  cat >"$dir/kubelet.yaml" <<KL
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $node_ip
readOnlyPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$dir/pki/ca.crt"}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: "unix://$dir/containerd.sock"
resolvConf: /etc/resolv.conf
clusterDomain: cluster.local
# Static pods (the e2e suite's MirrorPod tests write their manifests here).
staticPodPath: "$dir/manifests"
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
# ConfigMap and Secret updates reach running pods within ~10 s (the default is a minute).
syncFrequency: 10s
podPidsLimit: 4096
KL
  start_kubelet
  wait_for "node $node" 180 bash -c "'$kbin/kubectl' --kubeconfig '$dir/admin.kubeconfig' get node $node -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
  kubectl_ apply -f "$(dirname "$(command -v peapod-sandboxer)")/../share/peapod/runtimeclass.yaml" >/dev/null
  wait_for "the default service account" 120 kubectl_ get serviceaccount default
  trap - ERR
  log "up: node $node Ready; RuntimeClass peapod applied"
  echo "export KUBECONFIG=$dir/admin.kubeconfig PATH=$kbin:\$PATH"
}

case $cmd in
up) up ;;
down) down ;;
restart-kubelet) restart_kubelet ;;
*) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2 && exit 2 ;;
esac
