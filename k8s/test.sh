#!/usr/bin/env bash
# kubectl workloads on a real one-node Kubernetes whose pods run in peapod VMs (CTest label
# k8s; `make test` runs it). Installs peapod from the build (`cmake --install`, as `make install`
# does), builds or reuses the Kubernetes binaries (k8s/build.sh), brings the node up
# (k8s/node.sh), runs each workload, and always takes the node down.
#
#   k8s/test.sh BUILD_DIR [WORKLOAD...]     (all workloads by default)
#
# Exit 77 (CTest: skipped) where this host cannot run it, saying why.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
build=$(cd "${1:?usage: k8s/test.sh BUILD_DIR [WORKLOAD...]}" && pwd)
shift
skip() { echo "k8s/test.sh: SKIPPED: $*"; exit 77; }
[[ $(id -u) == 0 ]] || skip "needs root (a kubelet, containerd and VMs)"
[[ -x $build/sandboxer/peapod-sandboxer ]] || skip "$build is not built"
command -v go >/dev/null || skip "no Go toolchain (scripts/install-deps.sh installs it)"

dir=/tmp/ppk8s-test
passed=0 failed=0
failures=()
log() { echo "k8s/test.sh: $*"; }

cleanup() { "$here/node.sh" down --dir "$dir" >/dev/null 2>&1 || true; }
trap cleanup EXIT

log "installing peapod from $build"
cmake --install "$build" --prefix /usr/local --strip >/dev/null || { log "install failed"; exit 1; }
"$here/node.sh" down --dir "$dir" >/dev/null 2>&1 || true
env_line=$("$here/node.sh" up --dir "$dir" --stop-after 3600) || { log "the node did not come up"; exit 1; }
eval "$env_line"
guest_kernel=$(cat /usr/local/share/peapod/kernel-release)

# --------------------------------------------------------------- helpers

k() { kubectl "$@"; }
# wait_pod NAME PHASE|Ready SECONDS
wait_pod() {
  k wait --for="$2" "pod/$1" --timeout="${3:-300}s" >/dev/null
}
fail() { echo "  FAIL: $*"; return 1; }
expect_eq() { [[ $1 == "$2" ]] || fail "$3: got '$1', want '$2'"; }

# --------------------------------------------------------------- workloads

# A pod of two containers and an init container sharing an emptyDir, in one VM.
w_shared_volume_pod() {
  k apply -f - <<'YAML' >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: shared}
spec:
  runtimeClassName: peapod
  terminationGracePeriodSeconds: 2
  volumes: [{name: work, emptyDir: {}}]
  initContainers:
  - {name: init, image: docker.io/peapod/busybox:test, imagePullPolicy: Never,
     command: [sh, -c, "echo from-init > /work/init.txt"],
     volumeMounts: [{name: work, mountPath: /work}]}
  containers:
  - {name: a, image: docker.io/peapod/busybox:test, imagePullPolicy: Never,
     command: [sh, -c, "echo from-a > /work/a.txt; exec sleep 3600"],
     volumeMounts: [{name: work, mountPath: /work}]}
  - {name: b, image: docker.io/peapod/busybox:test, imagePullPolicy: Never,
     command: [sh, -c, "exec sleep 3600"],
     volumeMounts: [{name: work, mountPath: /work}]}
YAML
  wait_pod shared condition=Ready 300 || return 1
  expect_eq "$(k exec shared -c b -- cat /work/init.txt)" from-init "init's file seen by b" || return 1
  expect_eq "$(k exec shared -c b -- cat /work/a.txt)" from-a "a's file seen by b" || return 1
  expect_eq "$(k exec shared -c a -- uname -r)" "$guest_kernel" "a's kernel" || return 1
  expect_eq "$(k exec shared -c b -- cat /proc/sys/kernel/random/boot_id)" \
    "$(k exec shared -c a -- cat /proc/sys/kernel/random/boot_id)" "one VM for both" || return 1
  [[ $(k exec shared -c a -- cat /proc/sys/kernel/random/boot_id) != $(cat /proc/sys/kernel/random/boot_id) ]] ||
    fail "the pod shares the host's kernel" || return 1
  k delete pod shared --wait=true --timeout=120s >/dev/null
}

# kubectl logs -f and exec -i with stdin.
w_logs_and_stdin() {
  k run talk --image=docker.io/peapod/busybox:test --image-pull-policy=Never \
    --overrides='{"spec":{"runtimeClassName":"peapod","terminationGracePeriodSeconds":2}}' \
    --command -- sh -c 'i=0; while true; do echo line-$i; i=$((i+1)); sleep 0.2; done' >/dev/null
  wait_pod talk condition=Ready 300 || return 1
  local lines
  lines=$(timeout 10 kubectl logs -f talk | head -5 | tr '\n' ' ')
  expect_eq "$lines" "line-0 line-1 line-2 line-3 line-4 " "logs -f" || return 1
  local sum want
  want=$(head -c 1048576 /dev/urandom | tee /tmp/ppk8s-stdin | sha256sum | cut -d' ' -f1)
  sum=$(k exec -i talk -- sha256sum </tmp/ppk8s-stdin | cut -d' ' -f1)
  rm -f /tmp/ppk8s-stdin
  expect_eq "$sum" "$want" "1 MiB through exec -i" || return 1
  k delete pod talk --wait=true --timeout=120s >/dev/null
}

# A Job that runs to completion.
w_job() {
  k apply -f - <<'YAML' >/dev/null
apiVersion: batch/v1
kind: Job
metadata: {name: once}
spec:
  backoffLimit: 0
  template:
    spec:
      runtimeClassName: peapod
      restartPolicy: Never
      containers:
      - {name: c, image: docker.io/peapod/busybox:test, imagePullPolicy: Never,
         command: [sh, -c, "uname -r; exit 0"]}
YAML
  k wait --for=condition=complete job/once --timeout=300s >/dev/null || return 1
  expect_eq "$(k logs job/once)" "$guest_kernel" "the job's output" || return 1
  k delete job once --cascade=foreground --wait=true --timeout=120s >/dev/null
}

# Exec readiness and liveness probes: a failing liveness probe restarts the container, in the
# same VM (same boot id), and restartCount counts it.
w_probes() {
  k apply -f - <<'YAML' >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: probed}
spec:
  runtimeClassName: peapod
  terminationGracePeriodSeconds: 2
  containers:
  - name: c
    image: docker.io/peapod/busybox:test
    imagePullPolicy: Never
    command: [sh, -c, "touch /tmp/alive /tmp/ready; exec sleep 3600"]
    readinessProbe: {exec: {command: [cat, /tmp/ready]}, periodSeconds: 2}
    livenessProbe: {exec: {command: [cat, /tmp/alive]}, periodSeconds: 2, failureThreshold: 1}
YAML
  wait_pod probed condition=Ready 300 || return 1
  local boot
  boot=$(k exec probed -- cat /proc/sys/kernel/random/boot_id)
  k exec probed -- rm /tmp/ready
  k wait --for=condition=Ready=false pod/probed --timeout=60s >/dev/null || fail "readiness did not drop" || return 1
  k exec probed -- touch /tmp/ready
  wait_pod probed condition=Ready 60 || return 1
  k exec probed -- rm /tmp/alive
  local n=0
  for _ in $(seq 90); do
    n=$(k get pod probed -o jsonpath='{.status.containerStatuses[0].restartCount}')
    ((n >= 1)) && break
    sleep 1
  done
  ((n >= 1)) || fail "liveness failure did not restart the container (restartCount $n)" || return 1
  wait_pod probed condition=Ready 120 || return 1
  expect_eq "$(k exec probed -- cat /proc/sys/kernel/random/boot_id)" "$boot" "the VM after a restart" || return 1
  k delete pod probed --wait=true --timeout=120s >/dev/null
}

# kubectl port-forward into the pod's VM.
w_port_forward() {
  k run web --image=docker.io/peapod/busybox:test --image-pull-policy=Never \
    --overrides='{"spec":{"runtimeClassName":"peapod","terminationGracePeriodSeconds":2}}' \
    --command -- sh -c 'mkdir -p /www && echo hello-from-the-vm > /www/index.html && exec httpd -f -p 8080 -h /www' >/dev/null
  wait_pod web condition=Ready 300 || return 1
  kubectl port-forward pod/web 18080:8080 >/dev/null 2>&1 &
  local pf=$! body=""
  for _ in $(seq 50); do
    body=$(python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:18080/index.html", timeout=5).read().decode().strip())' 2>/dev/null) && break
    sleep 0.2
  done
  kill "$pf" 2>/dev/null
  wait "$pf" 2>/dev/null
  expect_eq "$body" hello-from-the-vm "GET through port-forward" || return 1
  k delete pod web --wait=true --timeout=120s >/dev/null
}

# ConfigMap, Secret and projected service-account token volumes; a ConfigMap update reaches the
# running pod.
w_config_volumes() {
  k create configmap cfg --from-literal=a=one >/dev/null
  k create secret generic sec --from-literal=b=two >/dev/null
  k apply -f - <<'YAML' >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: configured}
spec:
  runtimeClassName: peapod
  terminationGracePeriodSeconds: 2
  volumes:
  - {name: cfg, configMap: {name: cfg}}
  - {name: sec, secret: {secretName: sec}}
  - name: tok
    projected: {sources: [{serviceAccountToken: {path: token, expirationSeconds: 600}}]}
  containers:
  - name: c
    image: docker.io/peapod/busybox:test
    imagePullPolicy: Never
    command: [sleep, "3600"]
    volumeMounts:
    - {name: cfg, mountPath: /cfg}
    - {name: sec, mountPath: /sec}
    - {name: tok, mountPath: /tok}
YAML
  wait_pod configured condition=Ready 300 || return 1
  expect_eq "$(k exec configured -- cat /cfg/a)" one "the ConfigMap" || return 1
  expect_eq "$(k exec configured -- cat /sec/b)" two "the Secret" || return 1
  local dots
  dots=$(k exec configured -- cat /tok/token | tr -cd . | wc -c)
  expect_eq "$dots" 2 "the projected token is a JWT" || return 1
  k create configmap cfg --from-literal=a=three --dry-run=client -o yaml | k replace -f - >/dev/null
  local v=""
  for _ in $(seq 120); do
    v=$(k exec configured -- cat /cfg/a)
    [[ $v == three ]] && break
    sleep 1
  done
  expect_eq "$v" three "the ConfigMap after its update" || return 1
  k delete pod configured --wait=true --timeout=120s >/dev/null
  k delete configmap cfg >/dev/null
  k delete secret sec >/dev/null
}

# requests/limits size the VM: the memory limit plus the RuntimeClass overhead, the CPU limit.
w_limits() {
  k apply -f - <<'YAML' >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: sized}
spec:
  runtimeClassName: peapod
  terminationGracePeriodSeconds: 2
  containers:
  - name: c
    image: docker.io/peapod/busybox:test
    imagePullPolicy: Never
    command: [sleep, "3600"]
    resources:
      requests: {memory: 256Mi, cpu: "1"}
      limits: {memory: 256Mi, cpu: "1"}
YAML
  wait_pod sized condition=Ready 300 || return 1
  local total_kib limit
  total_kib=$(k exec sized -- sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)
  # 256 MiB + 384 MiB overhead = 640 MiB of VM, less what the guest kernel keeps.
  ((total_kib > 560 * 1024 && total_kib <= 640 * 1024)) ||
    fail "guest MemTotal ${total_kib} kB, want 560–640 MiB (256Mi limit + 384Mi overhead)" || return 1
  expect_eq "$(k exec sized -- nproc)" 1 "guest CPUs" || return 1
  limit=$(k exec sized -- cat /sys/fs/cgroup/memory.max)
  expect_eq "$limit" 268435456 "the container's memory.max" || return 1
  k delete pod sized --wait=true --timeout=120s >/dev/null
}

# A container over its memory limit is OOMKilled, and the pod's status says so. dd takes its
# 300 MB buffer in one read: a hog that grows a byte at a time (a shell building a string) keeps
# the cgroup reclaiming and refaulting its own code pages under TCG for minutes before the OOM
# killer runs (seen 2026-12-07: over 180 s once, ~90 s the next time).
w_oom() {
  k apply -f - <<'YAML' >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: hungry}
spec:
  runtimeClassName: peapod
  restartPolicy: Never
  containers:
  - name: c
    image: docker.io/peapod/busybox:test
    imagePullPolicy: Never
    command: [dd, if=/dev/zero, of=/dev/null, bs=300M, count=1]
    resources: {limits: {memory: 64Mi}}
YAML
  local reason=""
  for _ in $(seq 180); do
    reason=$(k get pod hungry -o jsonpath='{.status.containerStatuses[0].state.terminated.reason}')
    [[ -n $reason ]] && break
    sleep 1
  done
  expect_eq "$reason" OOMKilled "the terminated reason" || return 1
  k delete pod hungry --wait=true --timeout=120s >/dev/null
}

# kubelet and the sandboxer restarted (-9) leave a running pod running, in the same VM.
w_restarts() {
  k run steady --image=docker.io/peapod/busybox:test --image-pull-policy=Never \
    --overrides='{"spec":{"runtimeClassName":"peapod","terminationGracePeriodSeconds":2}}' \
    --command -- sleep 3600 >/dev/null
  wait_pod steady condition=Ready 300 || return 1
  local boot
  boot=$(k exec steady -- cat /proc/sys/kernel/random/boot_id)
  "$here/node.sh" restart-kubelet --dir "$dir" 2>/dev/null
  # peapod-supervise starts the sandboxer again, as systemd's Restart=on-failure would.
  pkill -KILL -x peapod-sandboxe
  sleep 4
  wait_for_ready steady || return 1
  expect_eq "$(k exec steady -- cat /proc/sys/kernel/random/boot_id)" "$boot" "the VM after both restarts" || return 1
  expect_eq "$(k get pod steady -o jsonpath='{.status.containerStatuses[0].restartCount}')" 0 "restartCount" || return 1
  pgrep -x peapod-sandboxe >/dev/null || fail "the sandboxer was not restarted" || return 1
  k delete pod steady --wait=true --timeout=120s >/dev/null
}
wait_for_ready() {
  for _ in $(seq 120); do
    [[ $(k get pod "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]] &&
      k exec "$1" -- true 2>/dev/null && return 0
    sleep 1
  done
  fail "$1 is not Ready and reachable after the restarts"
}

# Deleting the pods leaves nothing of them on the node.
w_nothing_left() {
  local qemus records
  for _ in $(seq 60); do
    qemus=$(pgrep -fc 'qemu-system.*peapod-' || true)
    records=$(find /var/lib/peapod/pods -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    ((qemus == 0 && records == 0)) && break
    sleep 1
  done
  expect_eq "$qemus" 0 "QEMUs left" || return 1
  expect_eq "$records" 0 "pod records left" || return 1
  expect_eq "$(find /run/peapod/pods -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)" 0 "run dirs left"
}

all=(shared_volume_pod logs_and_stdin job probes port_forward config_volumes limits oom restarts
  nothing_left)
want=("${@:-${all[@]}}")
for w in "${want[@]}"; do
  log "--- $w"
  if "w_$w"; then
    passed=$((passed + 1))
    log "ok   $w"
  else
    failed=$((failed + 1))
    failures+=("$w")
    log "FAIL $w"
    k get pods -A -o wide 2>&1 | sed 's/^/  /'
    # What it left goes, so the next workload starts clean.
    k delete jobs,pods --all --wait=true --timeout=120s >/dev/null 2>&1
  fi
done
log "$passed passed, $failed failed${failures:+: ${failures[*]}}"
((failed == 0))
